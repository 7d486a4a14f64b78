"""Engram retrofitted into Hugging Face causal LMs (engramlm.retrofit; SPEC §2.7).

Tiny models built from config objects (no downloads) with a tiny byte-level BPE trained on real
Python documentation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import stdlib_files

transformers = pytest.importorskip("transformers")

from engramlm import EngramConfig, TokenizerMismatchError  # noqa: E402
from engramlm.data import EOS_TOKEN, PAD_TOKEN, Document, train_tokenizer  # noqa: E402
from engramlm.retrofit import (  # noqa: E402
    EngramDecoderLayer,
    engram_modules,
    engram_parameters,
    load_retrofit,
    retrofit,
    save_retrofit,
    train_retrofit,
)
from engramlm.train import TrainConfig  # noqa: E402

VOCAB = 512
ARCHS = ["llama", "qwen2", "gpt2"] + (["qwen3"] if hasattr(transformers, "Qwen3Config") else [])
ENGRAM = EngramConfig.preset("tiny", pad_id=1)  # <pad> of train_tokenizer


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    """Sixty real documents: standard-library modules' source."""
    return [Document(f"{p.name}.txt", p.read_text(encoding="utf-8")) for p in stdlib_files()[:60]]


def _wrap(tokenizer: object) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


@pytest.fixture(scope="module")
def tokenizer(docs: list[Document], tmp_path_factory: pytest.TempPathFactory):
    return _wrap(train_tokenizer(docs, VOCAB, tmp_path_factory.mktemp("tok")))


def build(arch: str, vocab_size: int = VOCAB, num_layers: int = 2) -> torch.nn.Module:
    """A tiny, seeded, eval-mode HF causal LM of ``arch``."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    decoder = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        **common,
    )
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**decoder))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**decoder))
    elif arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **decoder))
    else:
        config = transformers.GPT2Config(
            n_embd=64, n_layer=num_layers, n_head=4, n_positions=256, **common
        )
        model = transformers.GPT2LMHeadModel(config)
    return model.eval()


def _ids(batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _activate(model: torch.nn.Module) -> None:
    """Make every Engram non-zero: random W_V and short-conv filters (conv state matters)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for engram in engram_modules(model).values():
            w = engram.kv_proj.weight[engram.value_rows]
            w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
            c = engram.short_conv.weight
            c.copy_(torch.randn(c.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_unchanged_at_init(arch: str, tokenizer) -> None:
    model = build(arch)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        retrofit(model, tokenizer, ENGRAM)
        after = model(ids).logits
    assert isinstance(
        model.base_model.get_submodule("layers" if arch != "gpt2" else "h")[1], EngramDecoderLayer
    )
    assert torch.equal(before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_engram_parameters_require_grad(arch: str, tokenizer) -> None:
    model = retrofit(build(arch), tokenizer, ENGRAM)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable == {id(p) for p in engram_parameters(model)}


@pytest.mark.parametrize("arch", ARCHS)
def test_engram_only_training_lowers_validation_loss(arch: str, tokenizer, docs) -> None:
    model = retrofit(build(arch), tokenizer, ENGRAM)
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    config = TrainConfig(
        steps=30, lr=3e-3, seq_len=64, batch_size=8, warmup_steps=3, eval_batches=4
    )
    report = train_retrofit(model, tokenizer, config, documents=docs)
    unchanged = all(torch.equal(base[n], p) for n, p in model.named_parameters() if n in base)
    assert unchanged and report["val_loss_after"] < report["val_loss_before"] - 0.02, report


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generate_matches_full_forward_recomputation(arch: str, tokenizer) -> None:
    model = retrofit(build(arch), tokenizer, ENGRAM)
    _activate(model)
    prompt = _ids(length=7)
    out = model.generate(
        prompt,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=1,
        output_logits=True,
        return_dict_in_generate=True,
    )
    seq, logits = prompt, []
    with torch.no_grad():
        for _ in range(12):
            last = model(seq, use_cache=False).logits[:, -1]  # [B, V], no KV cache
            logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(logits))


def test_engram_changes_the_output_once_non_zero(tokenizer) -> None:
    """The decode test above would be vacuous if an active Engram left the logits unchanged."""
    model, ids = build("llama"), _ids()
    with torch.no_grad():
        before = model(ids).logits
        retrofit(model, tokenizer, ENGRAM)
        _activate(model)
        after = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)


def test_decode_state_travels_with_the_cache_not_the_model(tokenizer) -> None:
    """Another sequence run in between must not disturb a cache's Engram state."""
    model = retrofit(build("llama"), tokenizer, ENGRAM)
    _activate(model)
    ids, other = _ids(), _ids(length=5) + 1
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).cache
        model(other, use_cache=True)  # a fresh sequence through the same modules
        step = model(ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]  # [B, V]
        full = model(ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_beam_search_matches_uncached_beam_search(arch: str, tokenizer) -> None:
    """Beam reordering must move the hash prefix and conv states with the keys and values."""
    model = retrofit(build(arch), tokenizer, ENGRAM)
    _activate(model)
    prompt = _ids(length=7)
    beam = dict(num_beams=4, do_sample=False, max_new_tokens=8, pad_token_id=1)
    cached = model.generate(prompt, use_cache=True, **beam)
    uncached = model.generate(prompt, use_cache=False, **beam)
    base = build(arch).generate(prompt, **beam)
    assert not torch.equal(cached, base), "Engram must change the beams for the test to bite"
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_row_generates_as_it_would_alone(arch: str, tokenizer) -> None:
    """Pads (here token 7, not Engram's pad id) are neither hashed nor fed to the short conv."""
    model = retrofit(build(arch), tokenizer, ENGRAM)
    _activate(model)
    short, long = _ids(batch=1, length=6), _ids(batch=1, length=10) + 1
    pads = torch.full((1, 4), 7)
    batch = torch.cat([torch.cat([pads, short], dim=1), long])  # [2, 10], row 0 left-padded
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    greedy = dict(
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=1,
        output_logits=True,
        return_dict_in_generate=True,
    )
    padded = model.generate(batch, attention_mask=mask, **greedy)
    alone = model.generate(short, **greedy)
    assert torch.equal(padded.sequences[0, 4:], alone.sequences[0])
    torch.testing.assert_close(
        torch.stack(padded.logits)[:, 0], torch.stack(alone.logits)[:, 0], atol=1e-4, rtol=1e-4
    )


def test_padding_after_a_real_token_is_refused(tokenizer) -> None:
    model = retrofit(build("llama"), tokenizer, ENGRAM)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    with pytest.raises(ValueError, match="row 1 has a 0 after a 1.*left padding only"):
        model(ids, attention_mask=mask)


def test_a_cache_without_engram_state_is_refused(tokenizer) -> None:
    model = retrofit(build("llama"), tokenizer, ENGRAM)
    with pytest.raises(TypeError, match="keeps its decode state in an engramlm.hf.EngramCache"):
        model(_ids(), cache=transformers.DynamicCache(), use_cache=True)


def test_assisted_decoding_is_refused(tokenizer) -> None:
    """Engram's state cannot rewind, so decoding that crops the cache must not start."""
    model = retrofit(build("llama"), tokenizer, ENGRAM)
    with pytest.raises(ValueError, match="stateful"):
        model.generate(_ids(length=7), prompt_lookup_num_tokens=3, max_new_tokens=4)


def test_bf16_base_model_keeps_fp32_tables(tokenizer) -> None:
    model = build("llama").to(torch.bfloat16)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    retrofit(model, tokenizer, ENGRAM)
    engram = engram_modules(model)[1]
    assert engram.table.weight.dtype == torch.float32
    assert {p.dtype for n, p in engram.named_parameters() if not n.startswith("table.")} == {
        torch.bfloat16
    }
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, before)  # W_V = 0 still
    _activate(model)
    model(ids).logits.float().square().mean().backward()
    assert engram.table.weight.grad.dtype == torch.float32
    assert engram.table.weight.grad.abs().sum() > 0


def test_bf16_retrofit_reloads_with_fp32_tables(tokenizer, tmp_path: Path) -> None:
    model = retrofit(build("llama").to(torch.bfloat16), tokenizer, ENGRAM)
    _activate(model)
    save_retrofit(model, tmp_path)
    loaded = load_retrofit(build("llama").to(torch.bfloat16), tokenizer, tmp_path)
    assert engram_modules(loaded)[1].table.weight.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_gives_identical_logits(arch: str, tokenizer, tmp_path: Path) -> None:
    model = retrofit(build(arch), tokenizer, ENGRAM)
    _activate(model)
    save_retrofit(model, tmp_path)
    loaded = load_retrofit(build(arch), tokenizer, tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_refuses_another_tokenizer(tokenizer, docs, tmp_path: Path) -> None:
    save_retrofit(retrofit(build("llama"), tokenizer, ENGRAM), tmp_path / "rf")
    other = _wrap(train_tokenizer(docs[:30], VOCAB, tmp_path / "tok"))
    with pytest.raises(TokenizerMismatchError, match="fingerprint"):
        load_retrofit(build("llama"), other, tmp_path / "rf")


def test_training_refuses_another_tokenizer(tokenizer, docs, tmp_path: Path) -> None:
    model = retrofit(build("llama"), tokenizer, ENGRAM)
    other = _wrap(train_tokenizer(docs[:30], VOCAB, tmp_path))
    with pytest.raises(TokenizerMismatchError, match="fingerprint"):
        train_retrofit(model, other, TrainConfig(steps=1), documents=docs)


def test_training_refuses_config_fields_it_cannot_honour(tokenizer, docs) -> None:
    model = retrofit(build("llama"), tokenizer, ENGRAM)
    with pytest.raises(ValueError, match="grad_accum"):
        train_retrofit(model, tokenizer, TrainConfig(steps=1, grad_accum=2), documents=docs)


def test_tokenizer_larger_than_the_model_is_refused(tokenizer) -> None:
    with pytest.raises(TokenizerMismatchError, match="512 ids but the model embeds only 300"):
        retrofit(build("llama", vocab_size=300), tokenizer, ENGRAM)


def test_padded_embedding_rows_get_their_own_compressed_ids(tokenizer) -> None:
    model = retrofit(build("llama", vocab_size=VOCAB + 8), tokenizer, ENGRAM)
    lookup = model.engram_retrofit.compress_lookup
    assert lookup[VOCAB:].tolist() == list(range(int(lookup[:VOCAB].max()) + 1, lookup.max() + 1))


def test_compression_switched_off_hashes_raw_ids(tokenizer, tmp_path: Path) -> None:
    config = dataclasses.replace(ENGRAM, compress_tokens=False)
    model = retrofit(build("llama"), tokenizer, config)
    assert model.engram_retrofit.compress_lookup.tolist() == list(range(VOCAB))
    _activate(model)
    save_retrofit(model, tmp_path / "rf")
    loaded = load_retrofit(build("llama"), tokenizer, tmp_path / "rf")
    ids = _ids()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_layer_id_out_of_range_is_refused(tokenizer) -> None:
    config = EngramConfig.preset("tiny", pad_id=1, layer_ids=(1, 5))
    with pytest.raises(ValueError, match=r"layer_ids\[1\]=5 is out of range.*\[0, 2\)"):
        retrofit(build("llama"), tokenizer, config)


def test_several_residual_branches_are_refused(tokenizer) -> None:
    with pytest.raises(ValueError, match="hc_mult=4"):
        retrofit(build("gpt2"), tokenizer, EngramConfig.preset("tiny", pad_id=1, hc_mult=4))


def test_retrofitting_twice_is_refused(tokenizer) -> None:
    model = retrofit(build("llama"), tokenizer, ENGRAM)
    with pytest.raises(ValueError, match="already retrofitted"):
        retrofit(model, tokenizer, ENGRAM)


def test_cli_retrofits_a_saved_model_dir(tokenizer, docs, tmp_path: Path) -> None:
    from engramlm.cli import main

    model_dir, data = tmp_path / "model", tmp_path / "data"
    build("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data.mkdir()
    for doc in docs[:20]:
        (data / doc.name).write_text(doc.text)
    main(
        [
            "retrofit",
            "--model-dir",
            str(model_dir),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "3",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--eval-batches",
            "2",
            "--data",
            str(data),
            "--engram.table_sizes=[211,223]",
        ]
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"] == 3 and report["engram"]["table_sizes"] == [211, 223]
    loaded = load_retrofit(build("llama"), tokenizer, tmp_path / "out")
    assert set(engram_modules(loaded)) == {1}


def test_wrapped_layer_outside_a_model_forward_is_refused(tokenizer) -> None:
    model = retrofit(build("llama"), tokenizer, ENGRAM)
    with torch.no_grad():
        model(_ids())
        with pytest.raises(RuntimeError, match="no hash ids"):
            model.model.layers[1](torch.zeros(2, 24, 64))
