"""Qwen4-Exp's PLE layers on engramlm, against transformers' own Qwen4-Exp (another code base).

Tiny random models from transformers' config classes, every PLE weight randomised (transformers
initialises the conv and the norms at zero, which would hide their mapping), saved with
``save_pretrained`` and loaded back with ``engramlm.hf.load_offloaded``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the [hf] extra (transformers) is not installed"
)
qwen = pytest.importorskip(
    "transformers.models.qwen4_exp.modeling_qwen4_exp",
    reason="this transformers has no qwen4_exp (needs >= 5.24)",
)

from engramlm import qwen4_exp  # noqa: E402
from engramlm.engram import head_offsets  # noqa: E402

EOS = 5
VOCAB = 96


def tiny_config(**overrides):
    """Four decoder layers (three linear attention, one indexed), PLE on layers 1 and 3 (1-based),
    two hyper-connection streams, N = 3, K = 2, tables of ~4k rows in 3 checkpoint parts."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        hc_count=2,
        hc_lowrank=8,
        ple_layer_ids=[1, 3],
        ngram_size=3,
        heads_per_ngram=2,
        ple_embed_dim=16,
        ngram_vocab_size_base=1000,
        make_ngram_vocab_size_divisible_by=128,
        split_ngram_parts=3,
        eos_token_id=EOS,
        pad_token_id=EOS,
        seed=1234,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=8,
        indexer_compress_ratio=4,
    )
    fields.update(overrides)
    return transformers.Qwen4ExpTextConfig(**fields)


@torch.no_grad()
def randomise_ple(model) -> None:
    """Every PLE weight random; the LM head sharpened so argmax is not decided by rounding."""
    for module in model.modules():
        if isinstance(module, qwen.Qwen4ExpTextPLELayer):
            for name, p in module.named_parameters():
                std = 1.0 if "ngram_embedding" in name else 0.3
                p.normal_(0.0, std)
    model.lm_head.weight.mul_(8.0)


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.Qwen4ExpForCausalLM(tiny_config(**overrides)).eval()
    randomise_ple(model)
    return model


def ple_layers(model) -> list:
    return [layer.ple for layer in model.model.layers if layer.ple is not None]


def ids_with_eos(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random ids with EOS at a few places (one right at the start of row 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (batch, length), generator=g)
    ids[0, 0] = EOS
    ids[:, length // 2] = EOS
    ids[-1, length - 2] = EOS
    return ids


# --- the variant's constants against transformers' ---------------------------------------------


def test_head_primes_offsets_and_rows_match_transformers() -> None:
    model = tiny_model()
    hasher = qwen4_exp.ngram_hasher(model.config)
    shapes = qwen4_exp.table_shapes(model.config)
    for ple in ple_layers(model):
        emb = ple.ple_embedding
        assert (
            list(hasher.moduli[ple.layer_idx]),
            head_offsets(hasher.moduli[ple.layer_idx]).tolist(),
            shapes[ple.layer_idx],
            getattr(hasher, f"mult_{ple.layer_idx}").tolist(),
        ) == (
            emb.head_vocab_sizes,
            emb.head_offsets,
            tuple(emb.ngram_embedding.weight.shape),
            emb.layer_multipliers.tolist(),
        )


@pytest.mark.parametrize("with_history", [False, True])
def test_retrieved_rows_match_transformers_ngram_embedding(with_history: bool) -> None:
    """Hash ids, EOS resets and the history kept in the cache give the rows transformers
    looks up: prompts with EOS at the start, in the middle and near the end."""
    model = tiny_model()
    ids = ids_with_eos(3, 11)
    for layer in ple_layers(model):
        ours = qwen4_exp.from_transformers_layer(layer, model.config)
        history = None
        cache = None
        if with_history:
            history = torch.tensor([[7, EOS], [EOS, 9], [11, 12]])
            cache = transformers.DynamicCache(config=model.config)
            cache.update_conv_state(history, layer.layer_idx, state_idx=2, conv_kernel_size=2)
        theirs = layer.ple_embedding(ids, cache)  # [B, T, E]
        mine = ours.engram.retrieve(ours.hash_ids(ids, history))
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_engram_from_a_ple_layer_returns_that_layers_output() -> None:
    """engramlm's Engram built from one Qwen4ExpTextPLELayer's weights: same output, fp32,
    with a padding mask (transformers' conv_mask)."""
    model = tiny_model()
    B, T, M, D = 3, 13, model.config.hc_count, model.config.hidden_size
    ids = ids_with_eos(B, T)
    hidden = torch.randn(B, T, M * D)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    for layer in ple_layers(model):
        ours = qwen4_exp.from_transformers_layer(layer, model.config)
        with torch.no_grad():
            for conv_mask in (None, mask):
                theirs = layer(hidden, ids, None, conv_mask=conv_mask)
                mine = ours(hidden, ids, None, conv_mask=conv_mask)
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_engram_config_round_trips_through_dict() -> None:
    config = qwen4_exp.engram_config(tiny_config())
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --- load_offloaded: the whole model against transformers' ------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(transformers' model, its folder): save_pretrained in small shards, tables split in 3."""
    model = tiny_model()
    folder = tmp_path_factory.mktemp("qwen4_exp") / "model"
    model.save_pretrained(folder, max_shard_size="20KB")
    return model, folder


@pytest.fixture(autouse=True)
def _close_loaded_tables():
    """Models loaded by a test release their disk tiers at its end (files are locked while
    open, so a later load of the same tier would be refused)."""
    yield
    from engramlm.hf import close_tables

    while LOADED:
        close_tables(LOADED.pop())


LOADED: list = []


def offloaded(folder: Path, tier: str, table_dir: Path | None):
    from engramlm.hf import load_offloaded

    model = load_offloaded(folder, engram_tables=tier, table_dir=table_dir)
    LOADED.append(model)
    return model


@pytest.mark.parametrize("tier", ["disk", "host"])
def test_offloaded_logits_equal_transformers(saved, tmp_path: Path, tier: str) -> None:
    model, folder = saved
    ours = offloaded(folder, tier, tmp_path / "tier" if tier == "disk" else None)
    assert type(ours) is type(model)
    ids = ids_with_eos(3, 17)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    with torch.no_grad():
        for attention_mask in (None, mask):
            theirs = model(ids, attention_mask=attention_mask).logits
            mine = ours(ids, attention_mask=attention_mask).logits
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_offloaded_model_holds_no_ngram_table_in_memory(saved, tmp_path: Path) -> None:
    """Every PLE layer is engramlm's, over a disk table; no parameter of the model is an
    n-gram table (they never enter process memory whole)."""
    from engramlm.tables import OffloadedTable
    from engramlm.tables.disk import DiskStore

    model, folder = saved
    ours = offloaded(folder, "disk", tmp_path / "tier")
    ples = [layer.ple for layer in ours.model.layers if layer.ple is not None]
    biggest = max(p.numel() for p in ours.parameters())
    table_rows = min(ple.engram.table.num_rows for ple in ples)
    assert (
        [type(p) for p in ples],
        [type(p.engram.table) for p in ples],
        [type(p.engram.table.weight_store) for p in ples],
        biggest < table_rows * 4,
    ) == ([qwen4_exp.Qwen4ExpPLE] * 2, [OffloadedTable] * 2, [DiskStore] * 2, True)
    assert all(p.engram.table.read_only for p in ples)  # served: no Adam moments beside them


def test_forward_prefetches_every_ple_lookup(saved, tmp_path: Path, monkeypatch) -> None:
    """The rows of every PLE layer are requested as soon as the ids are known: each lookup is
    served by its prefetch, and each layer hashes the ids once (the prefetch's hash is reused)."""
    from engramlm.hashing import NgramHasher

    _, folder = saved
    ours = offloaded(folder, "disk", tmp_path / "tier")
    calls = []
    forward = NgramHasher.forward
    monkeypatch.setattr(NgramHasher, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    with torch.no_grad():
        ours(ids_with_eos(2, 9))
    tables = [layer.ple.engram.table for layer in ours.model.layers if layer.ple is not None]
    assert ([(t.prefetch_hits, t.prefetch_misses) for t in tables], len(calls)) == (
        [(1, 0), (1, 0)],
        2,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=False),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=False, left_padding=3),
    ],
    ids=["greedy", "beam", "greedy-left-padded"],
)
def test_generate_gives_transformers_tokens(saved, tmp_path: Path, kwargs: dict) -> None:
    """Prefill then cached decoding, a batch of two prompts with EOS inside, greedy and beam
    search (its reordering and batch expansion move the PLE state in the cache)."""
    model, folder = saved
    ours = offloaded(folder, "disk", tmp_path / "tier")
    ids = ids_with_eos(2, 8, seed=3)
    args = dict(max_new_tokens=12, min_new_tokens=12, pad_token_id=EOS, **kwargs)
    pad = args.pop("left_padding", 0)
    if pad:
        mask = torch.ones_like(ids)
        ids[1, :pad], mask[1, :pad] = EOS, 0
        args["attention_mask"] = mask
    with torch.no_grad():
        theirs = model.generate(ids, **args)
        mine = ours.generate(ids, **args)
    assert mine.tolist() == theirs.tolist()


def test_decode_state_sits_in_transformers_cache_slots(saved, tmp_path: Path) -> None:
    """After a prefill, the PLE layers' conv states and n-gram histories in the generation cache
    equal transformers' own (same slots, same layout), so the cache's beam reordering, batch
    expansion and (refused) cropping treat them alike."""
    model, folder = saved
    ours = offloaded(folder, "disk", tmp_path / "tier")
    ids = ids_with_eos(2, 10)
    with torch.no_grad():
        theirs = model(ids, use_cache=True).cache
        mine = ours(ids, use_cache=True).cache
    for layer in (0, 2):
        for slot in (1, 2):
            torch.testing.assert_close(
                mine.get_conv_state(layer, slot), theirs.get_conv_state(layer, slot)
            )
    assert mine.is_croppable == theirs.is_croppable


def test_decode_after_beam_reorder_equals_transformers(saved, tmp_path: Path) -> None:
    """Beam search's cache operation applied by hand to both models' caches after a prefill
    (rows picked as [1, 1, 0]: swapped and one duplicated): the next step's logits still agree,
    so the PLE state moved with the rows in ours as in theirs. (transformers' Qwen4-Exp cache
    has no batch_repeat_interleave; generate expands the prompt before the prefill instead.)"""
    model, folder = saved
    ours = offloaded(folder, "disk", tmp_path / "tier")
    ids = ids_with_eos(2, 10)
    step = torch.tensor([[7], [EOS], [9]])
    logits = []
    with torch.no_grad():
        for m in (model, ours):
            cache = m(ids, use_cache=True).cache
            cache.reorder_cache(torch.tensor([1, 1, 0]))
            logits.append(m(step, cache=cache, use_cache=True).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


# --- the disk tier: reuse, refusal, atomic builds --------------------------------------------


def test_second_load_reuses_the_disk_tier(saved, tmp_path: Path) -> None:
    _, folder = saved
    from engramlm.hf import close_tables

    close_tables(offloaded(folder, "disk", tmp_path / "tier"))
    files = sorted((tmp_path / "tier").rglob("*.engt"))
    before = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    offloaded(folder, "disk", tmp_path / "tier")
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == before


def test_a_tier_built_from_another_model_is_refused(saved, tmp_path: Path) -> None:
    from engramlm.hf import close_tables

    _, folder = saved
    other = tmp_path / "other"
    tiny_model(seed=1).save_pretrained(other)  # same shapes, other rows and files
    close_tables(offloaded(other, "disk", tmp_path / "tier"))
    with pytest.raises(ValueError, match=r"(?s)built from other tables.*parts.*bytes"):
        offloaded(folder, "disk", tmp_path / "tier")


def test_a_folder_without_manifest_is_not_used_as_tier(saved, tmp_path: Path) -> None:
    _, folder = saved
    (tmp_path / "tier").mkdir()
    (tmp_path / "tier" / "notes.txt").write_text("someone else's folder")
    with pytest.raises(ValueError, match="not a complete engramlm table tier"):
        offloaded(folder, "disk", tmp_path / "tier")


def test_full_disk_while_writing_leaves_no_tier(saved, tmp_path: Path, monkeypatch) -> None:
    """ENOSPC halfway through the rows: a clear error, the half-written tier removed; the next
    load builds a complete one."""
    from engramlm.tables import disk

    _, folder = saved
    write = disk._write_all
    calls = []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:  # header of table 1, its rows, header of table 2: then full
            raise OSError(errno.ENOSPC, "No space left on device")
        write(fd, data, offset)

    monkeypatch.setattr(disk, "_write_all", full_disk)
    with pytest.raises(OSError, match="disk full while writing the table tier"):
        offloaded(folder, "disk", tmp_path / "tier")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(disk, "_write_all", write)
    offloaded(folder, "disk", tmp_path / "tier")
    assert (tmp_path / "tier" / "tier.json").is_file()


# --- bad folders -------------------------------------------------------------------------------


def copy_of(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def table_shard(folder: Path) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / index["model.layers.2.ple.ple_embedding.ngram_embedding.shard_1.weight"]


def test_missing_shard_is_named(saved, tmp_path: Path) -> None:
    folder = copy_of(saved[1], tmp_path)
    shard = table_shard(folder)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name} is missing"):
        offloaded(folder, "disk", tmp_path / "tier")
    assert not (tmp_path / "tier").exists()


def test_truncated_shard_is_named(saved, tmp_path: Path) -> None:
    folder = copy_of(saved[1], tmp_path)
    shard = table_shard(folder)
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(ValueError, match=f"{shard.name} is truncated"):
        offloaded(folder, "host", None)


def test_table_shape_disagreeing_with_config_is_refused(saved, tmp_path: Path) -> None:
    folder = copy_of(saved[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["make_ngram_vocab_size_divisible_by"] = 1000  # padded rows 4096 -> 5000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"table ple_layer0 is \[4096, 4\].*config says \[5000, 4\]"
    ):
        offloaded(folder, "disk", tmp_path / "tier")


def test_hash_constants_disagreeing_with_config_are_refused(saved, tmp_path: Path) -> None:
    folder = copy_of(saved[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["seed"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer_multipliers.*wrong addresses"):
        offloaded(folder, "disk", tmp_path / "tier")


def test_model_type_without_ngram_tables_is_refused(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"'llama' model.*supported model types.*qwen4_exp"):
        offloaded(tmp_path / "llama", "disk", tmp_path / "tier")


def test_unknown_tier_is_refused(saved) -> None:
    with pytest.raises(ValueError, match="engram_tables must be 'host' or 'disk'"):
        offloaded(saved[1], "gpu", None)


# --- the command line --------------------------------------------------------------------------


def char_tokenizer():
    """One token per character, EOS at id 5: a tokenizer for the tiny model's 96 ids."""
    from tokenizers import Tokenizer, decoders, models

    chars = [chr(c) for c in range(32, 32 + VOCAB - 6)]
    vocab = {"<unk>": 0, "<s>": 1, "<a>": 2, "<b>": 3, "<c>": 4, "<eos>": EOS}
    vocab.update({c: i + 6 for i, c in enumerate(chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )


def test_generate_cli_continues_like_transformers(saved, tmp_path: Path, capsys) -> None:
    from engramlm.cli import main

    model, folder = saved
    folder = copy_of(folder, tmp_path)
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(folder)
    prompt = "The list type"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=EOS)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    main(
        ["generate", "--model-dir", str(folder), "--engram-tables", "disk", "--table-dir"]
        + [str(tmp_path / "tier"), "--prompt", prompt, "--temperature", "0"]
        + ["--max-new-tokens", "10"]
    )
    assert (capsys.readouterr().out, len(expected) > 0) == (prompt + expected + "\n", True)


def test_conditional_generation_folder_loads_as_its_own_class(tmp_path: Path) -> None:
    """A Qwen4-Exp folder with a (tiny) vision tower: Qwen4ExpForConditionalGeneration back,
    text logits equal to transformers'."""
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=4,
        temporal_patch_size=1,
        spatial_merge_size=1,
        num_position_embeddings=16,
    )
    config = transformers.Qwen4ExpConfig(
        text_config=tiny_config().to_dict(),
        vision_config=vision,
        image_token_id=90,
        video_token_id=91,
        vision_start_token_id=92,
        vision_end_token_id=93,
    )
    torch.manual_seed(0)
    model = transformers.Qwen4ExpForConditionalGeneration(config).eval()
    randomise_ple(model)
    model.save_pretrained(tmp_path / "model")
    ours = offloaded(tmp_path / "model", "disk", tmp_path / "tier")
    ids = ids_with_eos(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert type(ours) is type(model)


# --- memory ------------------------------------------------------------------------------------


def anon_rss() -> int:
    """Anonymous resident memory of this process (bytes): heap, not file pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) << 10
    raise OSError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_loading_streams_rows_without_holding_a_table(saved, tmp_path: Path, monkeypatch) -> None:
    """Two 32 MB tables go from the shards to a disk tier in 1 MB chunks: the process's heap
    never grows by a quarter of one table (transformers' own load holds them whole). The
    chunks are made small here; by default rows move 64 MiB at a time."""
    import threading

    from engramlm.tables import disk, offload

    torch.manual_seed(0)
    big = transformers.Qwen4ExpForCausalLM(tiny_config(ngram_vocab_size_base=500_000))
    table_bytes = big.model.layers[0].ple.ple_embedding.ngram_embedding.weight.numel() * 4
    big.save_pretrained(tmp_path / "model")
    del big
    offloaded(saved[1], "disk", tmp_path / "warm-up")  # imports and first-call allocations
    monkeypatch.setattr(offload, "CHUNK_ROWS", 1 << 16)  # 1 MB of rows of 4 dims
    monkeypatch.setattr(disk, "_CRC_CHUNK", 1 << 20)  # the closing checksum reads 1 MB at once
    base, peak, stop = anon_rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], anon_rss())
            stop.wait(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        offloaded(tmp_path / "model", "disk", tmp_path / "tier")
    finally:
        stop.set()
        sampler.join()
    assert (table_bytes > 30e6, peak[0] - base < table_bytes // 4) == (True, True), (
        peak[0] - base,
        table_bytes,
    )


def test_cache_rows_sizes_the_disk_tiers_row_cache(saved, tmp_path: Path) -> None:
    """(An existing empty table_dir is built into, as a missing one.)"""
    from engramlm.hf import load_offloaded

    model = load_offloaded(saved[1], engram_tables="disk", table_dir=tmp_path, cache_rows=1000)
    LOADED.append(model)
    stores = [layer.ple.engram.table.weight_store for layer in model.model.layers if layer.ple]
    assert [s.capacity for s in stores] == [1000, 1000]


def test_generating_from_a_folder_without_tokenizer_says_so(saved) -> None:
    from engramlm.hf import generate_offloaded

    with pytest.raises(ValueError, match="has no tokenizer"):
        generate_offloaded(saved[1], "x")
