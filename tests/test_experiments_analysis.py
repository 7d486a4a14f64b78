"""The mechanism experiments (logitlens, cka, gates, masking) on the shared trained pair.

One smoke run of all four (two seeds, one shared pair) checks outputs and reports; the other
tests check, on tiny untrained models, the properties the measurements rest on.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engramlm import EngramConfig
from engramlm.config import ModelConfig
from engramlm.data import prepare_corpus
from engramlm.experiments import cka, gates, logitlens, masking, run_experiment
from engramlm.experiments.common import SMOKE_TRAIN, check_finite
from engramlm.experiments.pair import block_outputs, continuation_mask, word_final_mask
from engramlm.model import EngramLM

NAMES = ("logitlens", "cka", "gates", "masking")
MODULES = {"logitlens": logitlens, "cka": cka, "gates": gates, "masking": masking}
PLOTS = {
    "logitlens": ["logitlens"],
    "cka": ["cka"],
    "gates": ["gate_heatmaps", "gate_by_class"],
    "masking": ["masking"],
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("runs")
    docs = {
        name: run_experiment(name, out_root=out, smoke=True, progress=False, seeds=(0, 1))
        for name in NAMES
    }
    return out, docs


@pytest.fixture(scope="module")
def corpus() -> Any:
    return prepare_corpus(SMOKE_TRAIN.data, vocab_size=SMOKE_TRAIN.vocab_size)


def tiny_model(hc_mult: int = 1, conv: bool = True) -> EngramLM:
    """An untrained 2-layer model with Engram at layer 1; a non-zero short conv by default."""
    engram = EngramConfig.preset("tiny", hc_mult=hc_mult)
    cfg = ModelConfig(vocab_size=64, max_seq_len=32, hc_mult=hc_mult, engram=engram)
    torch.manual_seed(0)
    model = EngramLM(cfg).eval()
    if conv:
        with torch.no_grad():
            model.layers[1].engram.short_conv.weight.normal_(std=0.5)
    return model


# --- smoke: outputs exist, are finite, reports render ---------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_smoke_run_writes_results_plots_and_report(smoke_runs, name: str) -> None:
    out, docs = smoke_runs
    doc = docs[name]
    assert (out / name / "results.json").exists()
    check_finite(doc["results"])
    for plot in PLOTS[name]:
        assert (out / name / f"{plot}.png").stat().st_size > 0
    text = MODULES[name].report(doc)
    assert text.startswith("## ") and f"`engramlm experiment {name}" in text
    assert f"img/results/{name}/" in text
    assert any(word in text for word in ("Reproduced", "reproduced", "measurable"))


def test_pair_is_trained_once_and_shared(smoke_runs) -> None:
    out, docs = smoke_runs
    links = sorted(p.name for p in (out / "_pair" / "models").iterdir())
    assert links == ["engram-seed0", "engram-seed1", "moe-seed0", "moe-seed1"]
    losses = {name: docs[name]["results"]["pair"]["engram"]["val_loss"] for name in NAMES}
    assert len({tuple(v) for v in losses.values()}) == 1  # every experiment read the same runs
    trained = [docs[name]["results"]["pair"]["trained_here"] for name in NAMES]
    assert trained == [True, False, False, False]


def test_smoke_logit_lens_last_layer_is_the_final_prediction(smoke_runs) -> None:
    kl = smoke_runs[1]["logitlens"]["results"]["kl"]
    for key in ("moe", "engram"):
        assert all(abs(seed[-1]) < 1e-4 for seed in kl[key]["per_seed"])
        assert all(v >= -1e-6 for seed in kl[key]["per_seed"] for v in seed)


def test_smoke_gates_are_probabilities(smoke_runs) -> None:
    for sentence in smoke_runs[1]["gates"]["results"]["sentences"]:
        for branches in sentence["gates"].values():
            assert all(0.0 < g < 1.0 for row in branches for g in row)
            assert all(len(row) == len(sentence["tokens"]) for row in branches)


# --- CKA ------------------------------------------------------------------------------------


def test_cka_of_a_representation_with_itself_is_one() -> None:
    X = torch.randn(50, 8)
    assert cka.linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_maps_scaling_and_shifts() -> None:
    X, noise = torch.randn(60, 10, dtype=torch.float64), torch.randn(60, 6, dtype=torch.float64)
    Y = X[:, :6] + noise
    Q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    base = cka.linear_cka(X, Y)
    assert 0.2 < base < 1.0
    assert cka.linear_cka(X @ Q, Y) == pytest.approx(base, abs=1e-10)
    assert cka.linear_cka(3.7 * X, 0.2 * Y) == pytest.approx(base, abs=1e-10)
    assert cka.linear_cka(X + 5.0, Y - 2.0) == pytest.approx(base, abs=1e-10)


def test_cka_of_independent_representations_is_near_zero() -> None:
    X, Y = torch.randn(400, 8), torch.randn(400, 8)
    assert abs(cka.linear_cka(X, Y)) < 0.05


def test_hsic_refuses_fewer_than_four_samples() -> None:
    K = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="n >= 4"):
        cka.hsic_unbiased(K, K)


def test_soft_index_sees_a_shift_to_deeper_layers() -> None:
    # Engram layer j most like MoE layer j + 1: a_j (rows) above b_j (columns).
    S = [[0.5, 0.9, 0.3, 0.1], [0.2, 0.5, 0.9, 0.3], [0.1, 0.2, 0.5, 0.9], [0.1, 0.1, 0.3, 0.9]]
    a = cka.soft_index(S, 2)
    b = cka.soft_index([list(c) for c in zip(*S, strict=True)], 2)
    assert all(ai > bi for ai, bi in zip(a[:3], b[:3], strict=True))
    assert cka.soft_index([[1.0, 0.0], [0.0, 1.0]], 1) == [1.0, 2.0]
    assert cka.soft_index([[-0.1, -0.2, 0.0]], 2) == [2.0]  # no positive weight: plain mean


# --- LogitLens ------------------------------------------------------------------------------


def test_logit_lens_of_the_last_block_is_the_final_prediction() -> None:
    model = tiny_model(hc_mult=2)
    ids = torch.randint(0, 64, (3, 16))
    kl = logitlens.layer_kl(model, ids)
    assert kl[-1] == pytest.approx(0.0, abs=1e-6) and kl[0] > 1e-4


def test_block_outputs_merge_streams_as_the_model_does() -> None:
    model = tiny_model(hc_mult=2)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad(), block_outputs(model) as outputs:
        logits = model(ids).logits
        lens = model.lm_head(model.final_norm(outputs[-1]))
    assert len(outputs) == len(model.layers)
    torch.testing.assert_close(lens, logits)


# --- gates ----------------------------------------------------------------------------------


def test_recorded_gates_reproduce_engram_output() -> None:
    """alpha * W_V e plus the short conv of it is exactly what the Engram module returned."""
    model = tiny_model(hc_mult=2)
    engram = model.layers[1].engram
    seen: dict[str, Any] = {}

    def keep(module: torch.nn.Module, args: tuple, output: tuple) -> None:
        seen["hidden"], seen["hash_ids"], seen["y"] = args[0], args[1], output[0]

    handle = engram.register_forward_hook(keep)
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad(), gates.record_gates(model) as recorded:
        model(ids)
        e = engram.retrieve(seen["hash_ids"])
        u = recorded[2].unsqueeze(-1) * engram.value(e).unsqueeze(2)  # [B, T, M, D]
        expected = u + engram.short_conv(u)[0]
    handle.remove()
    assert recorded[2].shape == (2, 20, 2)
    torch.testing.assert_close(expected, seen["y"])


def test_word_classes_split_words_into_pieces(corpus) -> None:
    tokenizer = corpus.tokenizer
    text = "OrderedDict ValueError collections PyObject_GetAttrString"
    ids = torch.tensor([tokenizer.encode(text).ids])
    cont, initial = continuation_mask(ids, tokenizer)
    assert int(initial.sum()) == 4  # one first piece per word
    pieces = sum(bool(tokenizer.decode([i]).strip()) for i in ids[0].tolist())  # not " "
    assert int(cont.sum()) == pieces - 4 > 0  # every other piece continues a word
    assert not (cont & initial).any()
    assert word_final_mask(ids, tokenizer)[0, :-1].sum() == 3  # the last word is cut off


# --- masking --------------------------------------------------------------------------------


def test_masked_logits_equal_the_model_without_engram() -> None:
    model = tiny_model(hc_mult=2)
    stripped = copy.deepcopy(model)
    for block in stripped.layers:
        block.engram = None
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
        with masking.engram_masked(model):
            masked = model(ids).logits
        without = stripped(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(masked, without, rtol=0, atol=0)
    assert not torch.allclose(full, masked)  # Engram did contribute
    torch.testing.assert_close(after, full)  # the hook is gone afterwards


def test_probes_mark_copyable_and_stored_targets(corpus) -> None:
    V = corpus.vocab_size
    tokenizer = corpus.tokenizer
    # A window: "a b c  x y  a b c": the second c is copyable; no trigram is in "training".
    a, b, c, x, y = 300, 301, 302, 303, 304
    window = torch.tensor([[a, b, c, x, y, a, b, c, x]])
    inputs, targets = window[:, :-1], window[:, 1:]
    masks = masking.probe_masks(inputs, targets, corpus, np.array([], dtype=np.int64))
    assert masks["reading"][0].tolist() == [False] * 6 + [True, True]  # c and x, recopied
    # With every trigram "in training", nothing is reading comprehension.
    keys = np.unique(
        masking._trigram_keys(
            window[0, :-2].numpy(), window[0, 1:-1].numpy(), window[0, 2:].numpy(), V
        )
    )
    masks = masking.probe_masks(inputs, targets, corpus, keys)
    assert not masks["reading"].any()
    # Factual targets are continuation pieces, never copyable ones.
    cont, _ = continuation_mask(window, tokenizer)
    assert not (masks["factual"] & ~cont[:, 1:]).any()


def test_retention_is_undefined_without_an_unmasked_score() -> None:
    assert masking.retention(0.2, 0.4) == pytest.approx(0.5)
    assert masking.retention(0.1, 0.0) is None
    assert masking.retention(0.0, 0.3) == 0.0  # nothing kept is a retention of 0, not None


def test_gate_verdict_needs_a_real_effect_not_just_a_higher_mean() -> None:
    from engramlm.experiments import gates

    def results(cont: float, initial: float, d: float) -> dict:
        seed = {"continuation": cont, "word_initial": initial, "other": 0.5, "effect_size": d}
        stat = {c: {"mean": seed[c], "std": 0.0} for c in ("continuation", "word_initial", "other")}
        diff = {"mean": cont - initial, "std": 0.0}
        return {"class_means": {"2": {**stat, "difference": diff, "per_seed": [seed]}}}

    assert gates.verdict(results(0.7, 0.4, 1.1)).startswith("**Reproduced**")
    assert "negligible" in gates.verdict(results(0.959, 0.957, 0.05))
    assert gates.verdict(results(0.4, 0.7, -1.1)).startswith("**Not reproduced**: the gate is not")
