"""Ablation switches of EngramConfig, and the `ablations` and `longctx` experiments (smoke size)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from engramlm import (
    CompressedVocab,
    Engram,
    EngramConfig,
    EngramLM,
    ModelConfig,
    NgramHasher,
    ngram_hash,
)
from engramlm.data import prepare_corpus
from engramlm.experiments import ablations, longctx, run_experiment
from engramlm.experiments.common import SMOKE_TRAIN
from engramlm.generate import generate_tokens
from engramlm.model import HyperConnections, model_stats
from engramlm.train import TrainConfig, load_run, train

V = 97  # vocabulary of the module-level tests
SWITCHES = [
    {"gate": "none"},
    {"multi_branch": False},
    {"compress_tokens": False},
    {"short_conv": False},
    {"gate": "none", "short_conv": False, "multi_branch": False},
]


def make(cfg: EngramConfig, hidden: int = 32) -> tuple[Engram, NgramHasher]:
    hasher = NgramHasher.from_config(cfg, pad_id=cfg.pad_id, compressed_vocab_size=V)
    return Engram(cfg, hidden, hasher.moduli[cfg.layer_ids[0]]), hasher


def mhc_model(**switches: object) -> ModelConfig:
    cfg = ModelConfig.preset("tiny-mhc")
    assert cfg.engram is not None
    return dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, **switches))


@pytest.fixture(scope="module")
def smoke_corpus():  # the smoke size's corpus (512-id tokenizer), cached on disk
    return prepare_corpus(SMOKE_TRAIN.data, vocab_size=SMOKE_TRAIN.vocab_size)


# --- the switches -------------------------------------------------------------------------------


def test_switches_at_defaults_leave_saved_configs_unchanged() -> None:
    d = EngramConfig.preset("tiny").to_dict()
    assert not {"multi_branch", "compress_tokens", "short_conv"} & d.keys()
    off = EngramConfig.preset("tiny", hc_mult=2, multi_branch=False, short_conv=False)
    assert EngramConfig.from_dict(off.to_dict()) == off


def test_invalid_switches_are_refused() -> None:
    with pytest.raises(ValueError, match="gate"):
        EngramConfig.preset("tiny", gate="off")
    with pytest.raises(ValueError, match="multi_branch=False needs hc_mult > 1"):
        EngramConfig.preset("tiny", multi_branch=False)
    with pytest.raises(TypeError, match="short_conv must be a bool"):
        EngramConfig.preset("tiny", short_conv=0)


def test_gate_none_fixes_alpha_at_one() -> None:
    cfg = EngramConfig.preset("tiny", hc_mult=2, gate="none")
    engram, hasher = make(cfg)
    with torch.no_grad():
        engram.short_conv.weight.normal_(0, 0.5)
    hidden, ids = torch.randn(2, 9, 2, 32), torch.randint(0, V, (2, 9))
    hash_ids = hasher(ids, 1)
    y, _ = engram(hidden, hash_ids)
    u = engram.value(engram.retrieve(hash_ids)).unsqueeze(2).expand(2, 9, 2, 32)
    conv, _ = engram.short_conv(u)
    torch.testing.assert_close(y, u + conv)  # alpha = 1 on both branches
    assert engram.kv_proj.out_features == 32 and engram.query_norm is None  # W_V only


def test_short_conv_off_returns_the_gated_value() -> None:
    full_cfg = EngramConfig.preset("tiny", hc_mult=2)
    full, hasher = make(full_cfg)
    off, _ = make(dataclasses.replace(full_cfg, short_conv=False))
    missing, unexpected = off.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith("short_conv.") for k in unexpected)
    hidden, hash_ids = torch.randn(2, 9, 2, 32), hasher(torch.randint(0, V, (2, 9)), 1)
    y, state = off(hidden, hash_ids)
    u, _ = full(hidden, hash_ids)  # zero-initialised conv: Y = U exactly
    torch.testing.assert_close(y, u)
    assert state.shape == (2, 2 * 32, 0)


def test_compression_off_hashes_raw_ids() -> None:
    cfg = ModelConfig.preset("tiny-engram", vocab_size=V)
    assert cfg.engram is not None
    lookup = np.arange(V) // 2  # a surjection V -> V' = 49
    vocab = CompressedVocab(lookup=lookup, num_compressed=49, fingerprint="test")
    ids = torch.randint(0, V, (2, 11))
    kwargs = dict(
        seed=cfg.engram.seed,
        layer_id=1,
        layer_ids=cfg.engram.layer_ids,
        table_sizes=cfg.engram.table_sizes,
        heads_per_ngram=cfg.engram.heads_per_ngram,
        max_ngram=cfg.engram.max_ngram,
    )
    pad = cfg.engram.pad_id
    on = EngramLM(dataclasses.replace(cfg, compressed_vocab_size=49), vocab)
    expected_on = ngram_hash(
        torch.as_tensor(lookup)[ids], pad_id=int(lookup[pad]), compressed_vocab_size=49, **kwargs
    )
    torch.testing.assert_close(on.compute_hash_ids(ids)[1], expected_on)
    raw_engram = dataclasses.replace(cfg.engram, compress_tokens=False)
    raw_cfg = dataclasses.replace(cfg, compressed_vocab_size=49, engram=raw_engram)
    assert raw_cfg.compressed_vocab_size is None  # no V' without compression
    off = EngramLM(raw_cfg, vocab)
    expected_off = ngram_hash(ids, pad_id=pad, compressed_vocab_size=V, **kwargs)
    torch.testing.assert_close(off.compute_hash_ids(ids)[1], expected_off)


def test_multi_branch_off_gates_one_fused_stream() -> None:
    model = EngramLM(mhc_model(multi_branch=False))
    block = model.layers[1]
    assert block.engram is not None and block.engram.num_keys == 1
    assert isinstance(block.engram_residual, HyperConnections)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    full = model(ids).logits
    cache = model.new_cache()
    steps = [model(ids[:, :4], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
def test_model_stats_count_every_switch(switches: dict) -> None:
    cfg = mhc_model(**switches)
    model = EngramLM(cfg)
    assert model_stats(cfg).total_params == sum(p.numel() for p in model.parameters())


def test_compression_off_survives_training_loading_and_generation(
    smoke_corpus, tmp_path: Path
) -> None:
    cfg = ModelConfig.preset("tiny-engram", max_seq_len=32)
    assert cfg.engram is not None
    cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, compress_tokens=False))
    train_cfg = TrainConfig(
        vocab_size=512, seq_len=16, batch_size=2, steps=2, eval_every=0, eval_batches=1,
        out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    train(cfg, train_cfg, corpus=smoke_corpus, progress=False)
    model, _ = load_run(tmp_path / "run")
    V = smoke_corpus.vocab_size
    assert model.config.compressed_vocab_size is None
    assert torch.equal(model.compress_lookup, torch.arange(V))
    assert model.vocab_fingerprint == smoke_corpus.compressed_vocab.fingerprint
    tokens = list(generate_tokens(model, torch.tensor([[5, 6, 7]]), 4, temperature=0))
    assert len(tokens) == 4


# --- ablations ----------------------------------------------------------------------------------


def test_each_ablation_changes_only_its_component(smoke_corpus, tmp_path: Path) -> None:
    from engramlm.experiments.common import Context

    ctx = Context(name="ablations", out_root=tmp_path, smoke=True, progress=False)
    configs = ablations.build_configs(ctx)
    full = configs[ablations.FULL]
    assert configs[ablations.MOE].engram is None
    assert configs[ablations.MOE].num_experts > full.num_experts  # the rho = 1 MoE
    for key in ablations.CAPACITY:  # only the table rows shrink
        cfg = configs[key]
        assert dataclasses.replace(cfg.engram, table_sizes=full.engram.table_sizes) == full.engram
        assert dataclasses.replace(cfg, engram=None) == dataclasses.replace(full, engram=None)
        assert all(
            a < b for a, b in zip(cfg.engram.table_sizes, full.engram.table_sizes, strict=True)
        )
    assert configs["rows_min"].engram.table_sizes == (2, 2)
    for ab in ablations.ablations(full.num_layers):
        ref, cfg = configs[ab.reference], configs[ab.key]
        assert ref.engram is not None and cfg.engram is not None
        changed = {
            k for k, v in cfg.engram.to_dict().items() if ref.engram.to_dict().get(k, True) != v
        } | {k for k in ref.engram.to_dict().keys() - cfg.engram.to_dict().keys()}
        assert changed - {"table_sizes"} == set(ab.engram), ab.key
        assert dataclasses.replace(cfg, engram=None) == dataclasses.replace(ref, engram=None)
        # Same total parameters as the reference, up to prime table sizes.
        a, b = model_stats(cfg).total_params, model_stats(ref).total_params
        assert abs(a - b) / b < 0.01, ab.key


def test_ablations_smoke_run(smoke_corpus, tmp_path: Path) -> None:
    doc = run_experiment("ablations", out_root=tmp_path, smoke=True, progress=False)
    out = tmp_path / "ablations"
    assert json.loads((out / "results.json").read_text()) == doc
    for plot in ("ablation_deltas", "ablation_curves"):
        assert (out / f"{plot}.png").stat().st_size > 0
    res = doc["results"]
    assert res["noise_seeds"] == [0, 1]  # one seed asked: the reference gets a second
    assert [r["key"] for r in res["ablations"]] == [a.key for a in ablations.ablations(3)]
    refs = res["references"]
    noise = max(refs[ablations.FULL]["val_loss"]) - min(refs[ablations.FULL]["val_loss"])
    assert res["noise"] == pytest.approx(noise)
    for r in res["ablations"]:  # delta = ablation - its reference, same seed (seed 0 here)
        reference = refs[r["reference"]]
        ref = dict(zip(reference["seeds"], reference["val_loss"], strict=True))
        assert r["delta"] == pytest.approx([r["val_loss"][0] - ref[0]])
        worse, better = r["delta"][0] > noise, r["delta"][0] < -noise
        assert r["effect"] == ("worse" if worse else "better" if better else "within noise")
    cap = res["capacity"]
    assert [r["key"] for r in cap["variants"]] == list(ablations.CAPACITY)
    for r in cap["variants"]:
        assert r["table_rows"] < cap["full_table_rows"]
        gains = zip(cap["moe_val_loss"], r["val_loss"], cap["gain"], r["gain_kept"], strict=True)
        for moe, loss, gain, kept in gains:
            assert kept == pytest.approx((moe - loss) / gain)
    text = ablations.report(doc)
    assert text.startswith("## Ablations (`engramlm experiment ablations`)")
    assert "| smallest tables |" in text
    assert "**Verdict:** regressions beyond the noise floor" in text


# --- long context -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filler(smoke_corpus) -> longctx.Filler:
    c = smoke_corpus
    return longctx.Filler(np.asarray(c.val.tokens), c.tokenizer, c.eos_id)


@pytest.mark.parametrize("task", longctx.TASKS)
def test_probe_answers_follow_from_the_text(task: str, filler: longctx.Filler) -> None:
    probes = longctx.make_probes(task, 10, filler, (220, 300), longctx.SMOKE_SIZES, seed=3)
    for p in probes:
        assert longctx.solve(p) == p.answer_texts()


@pytest.mark.parametrize("task", longctx.TASKS)
def test_probes_respect_length_and_round_trip(task: str, filler: longctx.Filler) -> None:
    tok = filler.tokenizer
    for p in longctx.make_probes(task, 10, filler, (260, 260), longctx.SMOKE_SIZES, seed=4):
        enc = longctx.encode_probe(p, tok)
        assert 260 - 8 <= len(enc.ids) <= 260
        assert tok.decode(enc.ids) == p.text
        assert [tok.decode(enc.ids[i:j]) for i, j in enc.spans] == p.answer_texts()


def test_probes_are_deterministic_in_the_seed(filler: longctx.Filler) -> None:
    def texts(seed: int) -> list[str]:
        probes = longctx.make_probes("vt", 3, filler, (250, 250), longctx.SMOKE_SIZES, seed)
        return [p.text for p in probes]

    assert texts(7) == texts(7) and texts(7) != texts(8)


class _Oracle(nn.Module):
    """Predicts the true next token (or, with ``wrong``, a different one) at every position."""

    def __init__(self, vocab: int, wrong: bool = False) -> None:
        super().__init__()
        self.vocab, self.shift = vocab, int(wrong)

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        nxt = (torch.roll(ids, -1, dims=1) + self.shift) % self.vocab  # [B, T]
        return SimpleNamespace(logits=nn.functional.one_hot(nxt, self.vocab).float())


def test_score_counts_exact_answers(filler: longctx.Filler) -> None:
    tok = filler.tokenizer
    probes = longctx.make_probes("mq_niah", 3, filler, (250, 250), longctx.SMOKE_SIZES, seed=5)
    enc = [longctx.encode_probe(p, tok) for p in probes]
    V = tok.get_vocab_size()
    right = longctx.score(_Oracle(V), enc, pad_id=0, batch_size=2)  # type: ignore[arg-type]
    wrong = longctx.score(_Oracle(V, wrong=True), enc, pad_id=0)  # type: ignore[arg-type]
    assert right["accuracy"] == 1.0 and wrong["accuracy"] == 0.0
    assert right["items"] == 3 * longctx.SMOKE_SIZES.niah_needles


@pytest.mark.parametrize("sizes", [longctx.DEFAULT_SIZES, longctx.SMOKE_SIZES])
def test_every_training_window_holds_a_whole_probe(sizes: longctx.Sizes) -> None:
    # A window of T tokens drawn anywhere in a run of back-to-back probes of at most P tokens
    # (EOS included) contains a whole one when 2P - 1 <= T.
    assert 2 * (sizes.probe_max + 1) - 1 <= sizes.seq_len
    assert sizes.probe_min <= sizes.probe_max and max(sizes.eval_lengths) <= sizes.seq_len


def test_longctx_smoke_run(smoke_corpus, tmp_path: Path) -> None:
    doc = run_experiment("longctx", out_root=tmp_path, smoke=True, progress=False)
    out = tmp_path / "longctx"
    assert (out / "longctx_accuracy.png").stat().st_size > 0
    res = doc["results"]
    sizes = longctx.SMOKE_SIZES
    assert len(res["comparison"]) == len(longctx.TASKS) * len(sizes.eval_lengths)
    for row in res["comparison"]:
        assert 0.0 <= row["moe"] <= 1.0 and 0.0 <= row["engram"] <= 1.0
        assert math.isfinite(row["engram_nll"])
    text = longctx.report(doc)
    assert text.startswith("## Long context (`engramlm experiment longctx`)")
    assert "**Verdict:**" in text
