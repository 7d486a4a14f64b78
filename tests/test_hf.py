"""transformers integration: Auto classes, generate/pipeline = our decoding, files, disk tables."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import stdlib_page

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from transformers import AutoModelForCausalLM, pipeline  # noqa: E402

from engramlm import (  # noqa: E402
    CompressedVocab,
    EngramConfig,
    EngramLM,
    ModelConfig,
    TokenizerMismatchError,
)
from engramlm.checkpoint import save_checkpoint  # noqa: E402
from engramlm.data import Document, train_tokenizer  # noqa: E402
from engramlm.generate import generate_tokens  # noqa: E402
from engramlm.hf import (  # noqa: E402
    TABLE_FILE,
    EngramCache,
    EngramForCausalLM,
    EngramHFConfig,
    export_run,
)
from engramlm.tables import offload  # noqa: E402

PAGES = ("functools", "collections", "json", "string")
PROMPT = "The json module can"


def pages(names: tuple[str, ...]) -> list[Document]:
    """Real text: standard-library modules' source."""
    return [Document(name, stdlib_page(name).read_text()) for name in names]


def build_model(tokenizer, **overrides) -> EngramLM:
    """A tiny random EngramLM (4 residual streams, MoE) whose every part matters: the conv is
    not left at its zero init, and the head is sharpened so argmax is not decided by rounding."""
    vocab = CompressedVocab.from_tokenizer(tokenizer)
    config = ModelConfig.preset(
        "tiny-mhc",
        vocab_size=tokenizer.get_vocab_size(),
        compressed_vocab_size=vocab.num_compressed,
        max_seq_len=64,
        **overrides,
    )
    torch.manual_seed(0)
    model = EngramLM(config, vocab).eval()
    with torch.no_grad():
        for block in model.layers:
            if block.engram is not None:
                torch.nn.init.normal_(block.engram.short_conv.weight, std=0.5)
        model.lm_head.weight.mul_(50)
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_tokenizer(pages(PAGES), 512, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer) -> EngramLM:
    return build_model(tokenizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, model: EngramLM, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("hf")
    EngramForCausalLM.from_engramlm(model, tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompt(tokenizer) -> torch.Tensor:
    ids = tokenizer.encode(PROMPT).ids
    return torch.tensor([ids, ids[::-1]])  # [2, T]: a batch of equal-length prompts


def reference_tokens(model: EngramLM, prompt: torch.Tensor, n: int, eos: int, pad: int, **kw):
    """generate_tokens' continuation, finished rows padded after EOS and stopped when all
    rows are done - what transformers' generate does with an eos_token_id."""
    steps = torch.stack(list(generate_tokens(model, prompt, n, **kw)), dim=1)  # [B, n]
    done = torch.zeros(len(steps), dtype=torch.bool)
    out = []
    for t in range(n):
        out.append(torch.where(done, pad, steps[:, t]))
        done |= steps[:, t] == eos
        if done.all():
            break
    return torch.stack(out, dim=1)


def continuation(hf_model: EngramForCausalLM, prompt: torch.Tensor, n: int, **kw) -> torch.Tensor:
    return hf_model.generate(prompt, max_new_tokens=n, **kw)[:, prompt.shape[1] :]


def test_importing_engramlm_does_not_import_transformers() -> None:
    code = "import sys, engramlm; assert 'transformers' not in sys.modules; engramlm.EngramLM"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ""})


def test_config_mirrors_model_config(model: EngramLM) -> None:
    hf_fields = {f.name for f in dataclasses.fields(EngramHFConfig)}
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= hf_fields
    assert EngramHFConfig.from_model_config(model.config).to_model_config() == model.config


def test_invalid_config_is_refused_with_model_config_message() -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        EngramHFConfig(num_heads=4, num_kv_heads=3)


def test_auto_model_logits_equal_engramlm(saved: Path, model: EngramLM, prompt) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(saved)
    assert isinstance(loaded, EngramForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, model(prompt).logits, rtol=0, atol=0)


def test_labels_loss_is_next_token_cross_entropy_over_unignored_labels(saved: Path, prompt) -> None:
    """Token t is scored against label t+1; labels of -100 drop out of the mean."""
    loaded = EngramForCausalLM.from_pretrained(saved)
    labels = prompt.clone()
    labels[:, 1:4] = -100
    with torch.no_grad():
        out = loaded(prompt, labels=labels)
    logits, targets = out.logits[:, :-1], prompt[:, 1:]  # [B, T-1, V], [B, T-1]
    kept = torch.ones_like(targets, dtype=torch.bool)
    kept[:, :3] = False
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    everywhere = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert not torch.allclose(expected, everywhere)  # ignoring must change the value
    torch.testing.assert_close(out.loss, expected)


def test_greedy_generate_equals_generate_tokens(saved: Path, model: EngramLM, prompt) -> None:
    loaded = EngramForCausalLM.from_pretrained(saved)
    got = continuation(loaded, prompt, 20, do_sample=False)
    cfg = loaded.generation_config
    expected = reference_tokens(
        model, prompt, 20, cfg.eos_token_id, cfg.pad_token_id, temperature=0
    )
    assert torch.equal(got, expected)


def test_sampling_generate_equals_generate_tokens_under_one_seed(
    saved: Path, model: EngramLM, prompt
) -> None:
    loaded = EngramForCausalLM.from_pretrained(saved)
    with torch.no_grad():  # soften the sharpened head so sampling has choices to make
        loaded.model.lm_head.weight.div_(50)
        model_copy = EngramLM(model.config, loaded.compressed_vocab).eval()
        model_copy.load_state_dict(loaded.model.state_dict())
    torch.manual_seed(7)
    got = continuation(loaded, prompt, 20, do_sample=True, temperature=0.9, top_k=None, top_p=None)
    torch.manual_seed(7)
    cfg = loaded.generation_config
    expected = reference_tokens(
        model_copy, prompt, 20, cfg.eos_token_id, cfg.pad_token_id, temperature=0.9
    )
    assert torch.equal(got, expected)


def test_cached_generate_equals_full_forward_recomputation(saved: Path, prompt) -> None:
    loaded = EngramForCausalLM.from_pretrained(saved)
    loaded.generation_config.eos_token_id = None  # run all steps in both
    cached = continuation(loaded, prompt, 16, do_sample=False, use_cache=True)
    seq = prompt
    with torch.no_grad():
        for _ in range(16):
            logits = loaded(seq, use_cache=False).logits  # the whole sequence every step
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq[:, prompt.shape[1] :])


def test_beam_search_reorders_engram_state_with_the_beams(saved: Path, prompt) -> None:
    loaded = EngramForCausalLM.from_pretrained(saved)
    loaded.generation_config.eos_token_id = None
    with torch.no_grad():  # soften the head so the beams disagree
        loaded.model.lm_head.weight.div_(50)
    cached = continuation(loaded, prompt, 10, num_beams=3, do_sample=False, use_cache=True)
    uncached = continuation(loaded, prompt, 10, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_cache_carries_engram_state_between_calls(saved: Path, prompt) -> None:
    loaded = EngramForCausalLM.from_pretrained(saved)
    with torch.no_grad():
        full = loaded(prompt, use_cache=False).logits
        cache = EngramCache()
        loaded(prompt[:, :-1], cache=cache)
        assert cache.hash_prefix is not None and cache.conv_states  # Engram state travelled
        with pytest.warns(FutureWarning, match="past_key_values"):  # the old name still works
            last = loaded(prompt[:, -1:], past_key_values=cache).logits
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def test_padded_attention_mask_is_refused(saved: Path, prompt) -> None:
    loaded = EngramForCausalLM.from_pretrained(saved)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    with pytest.raises(ValueError, match="padded batches"):
        loaded.generate(prompt, attention_mask=mask, max_new_tokens=2)


def test_pipeline_greedy_equals_generate_tokens(saved: Path, model: EngramLM, tokenizer) -> None:
    generator = pipeline("text-generation", model=str(saved))
    out = generator(PROMPT, max_new_tokens=12, do_sample=False, return_tensors=True)
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    cfg = generator.model.generation_config
    expected = reference_tokens(model, ids, 12, cfg.eos_token_id, cfg.pad_token_id, temperature=0)
    assert out[0]["generated_token_ids"] == ids[0].tolist() + expected[0].tolist()


def test_save_load_round_trip_is_bitwise(saved: Path, tmp_path: Path) -> None:
    EngramForCausalLM.from_pretrained(saved).save_pretrained(tmp_path)
    for name in ["model.safetensors", TABLE_FILE.format(layer=1), "compressed_vocab.json"]:
        assert (tmp_path / name).read_bytes() == (saved / name).read_bytes(), name


def test_tokenizer_mismatch_is_refused(saved: Path, tmp_path: Path) -> None:
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    other = train_tokenizer(pages(("os",)), 512, tmp_path / "tok-cache")
    EngramForCausalLM.from_engramlm(build_model(other), other).tokenizer.save_pretrained(tmp_path)
    with pytest.raises(TokenizerMismatchError, match="fingerprint"):
        EngramForCausalLM.from_pretrained(tmp_path)


def test_disk_tier_logits_equal_in_memory(saved: Path, prompt, tmp_path: Path) -> None:
    memory = EngramForCausalLM.from_pretrained(saved)
    disk = EngramForCausalLM.from_pretrained(saved, engram_tables="disk", table_dir=tmp_path)
    assert all(type(t).__name__ == "OffloadedTable" for t in disk.model.engram_tables())
    with torch.no_grad():
        torch.testing.assert_close(disk(prompt).logits, memory(prompt).logits, rtol=0, atol=0)


def _anon_rss() -> int:
    """Anonymous resident memory of this process (bytes): heap, not file pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) << 10
    raise OSError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_disk_tier_load_never_holds_a_table(
    tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ~1M rows x 16 dims = 64 MB per table, streamed in 16k-row (1 MB) chunks.
    monkeypatch.setattr(offload, "CHUNK_ROWS", 1 << 14)
    big = build_model(
        tokenizer,
        engram=dataclasses.replace(
            ModelConfig.preset("tiny-mhc").engram, table_sizes=(131_072, 131_072)
        ),
    )
    table_bytes = big.engram_tables()[0].num_rows * big.engram_tables()[0].dim * 4
    EngramForCausalLM.from_engramlm(big, tokenizer).save_pretrained(tmp_path / "hf")
    del big

    base, peak, stop = _anon_rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _anon_rss())
            stop.wait(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        loaded = EngramForCausalLM.from_pretrained(
            tmp_path / "hf", engram_tables="disk", table_dir=tmp_path / "tables", table_cache_mb=2
        )
    finally:
        stop.set()
        sampler.join()
    assert loaded.model.engram_tables()[0].num_rows * 16 * 4 == table_bytes
    assert peak[0] - base < table_bytes // 4, (peak[0] - base, table_bytes)


def test_export_run_writes_a_loadable_directory(
    model: EngramLM, tokenizer, prompt, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    configs = {"model": model.config.to_dict()}
    (run / "config.json").write_text(json.dumps(configs))
    tokenizer.save(str(run / "tokenizer.json"))
    CompressedVocab.from_tokenizer(tokenizer).save(run / "compressed_vocab.json")
    save_checkpoint(run, 0, model=model, optimizers={}, trainer_state={}, config=configs)

    out = export_run(run, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, model(prompt).logits, rtol=0, atol=0)


def test_overencoding_model_round_trips(tokenizer, tmp_path: Path) -> None:
    oe = EngramConfig.preset("tiny", layer_ids=(0,), hc_mult=4, pad_id=0)
    model = build_model(tokenizer, overencoding=oe)
    EngramForCausalLM.from_engramlm(model, tokenizer).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.overencoding == oe.to_dict()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_load_offloaded_logits_equal_in_memory(saved: Path, prompt, tmp_path: Path, tier: str):
    """engramlm's own folders through load_offloaded: tables on a tier, same logits."""
    from engramlm.hf import close_tables, load_offloaded

    memory = EngramForCausalLM.from_pretrained(saved)
    table_dir = tmp_path / "tier" if tier == "disk" else None
    served = load_offloaded(saved, engram_tables=tier, table_dir=table_dir)
    try:
        assert all(type(t).__name__ == "OffloadedTable" for t in served.model.engram_tables())
        with torch.no_grad():
            torch.testing.assert_close(served(prompt).logits, memory(prompt).logits, rtol=0, atol=0)
    finally:
        close_tables(served)
