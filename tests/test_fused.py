"""The fused decode kernels (engramlm.kernels, csrc/fused_decode.cpp) against the PyTorch path,
the spec's reference and the conformance vectors; and the model's decoding with them."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

from engramlm import Engram, EngramConfig, ModelConfig, NgramHasher, kernels
from engramlm.engram import FUSED_ROWS
from engramlm.generate import generate_tokens
from engramlm.hashing import DEAD, hash_ngrams
from engramlm.model import EngramLM
from engramlm.tables import DeviceTable, TablePlan, build_table, convert_table, fp8
from test_engram import V, make, randomise_conv, randomise_norms, reference_forward


@pytest.fixture(scope="module")
def ops():  # type: ignore[no-untyped-def]
    """The built kernels. Skipped only on a machine with no C++ compiler at all (the fallback,
    tested below, is what runs there); a compiler that fails to build them fails the tests."""
    got = kernels.fused_ops()
    if got is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler: the fused kernels cannot be built here")
        pytest.fail(f"the fused kernels did not build: {kernels.build_error()}")
    return got


# --- hashing --------------------------------------------------------------------------------


def test_hash_step_matches_the_conformance_vectors(ops, hash_vectors: list[dict]) -> None:  # type: ignore[no-untyped-def]
    for case in hash_vectors:
        cfg = case["config"]
        ids = torch.tensor(case["compressed_ids"])
        mult = torch.tensor([case["multipliers"]])
        mods = torch.tensor([case["head_moduli"]])
        rows, _ = ops.hash_step(ids, None, None, mult, mods, cfg["pad_id"], -1, False)
        assert rows[0].tolist() == case["expected_hash_ids"], case["name"]


@pytest.mark.parametrize("max_ngram,heads", [(2, 3), (3, 2), (4, 1)])
@pytest.mark.parametrize("reset,dead", [(False, False), (True, False), (False, True), (True, True)])
def test_hash_step_equals_hash_ngrams(
    ops, max_ngram: int, heads: int, reset: bool, dead: bool
) -> None:  # type: ignore[no-untyped-def]
    hasher = NgramHasher(
        seed=3,
        layer_ids=(0, 2, 5),
        table_sizes=(500,) * (max_ngram - 1),
        heads_per_ngram=heads,
        max_ngram=max_ngram,
        pad_id=1,
        compressed_vocab_size=V,
        reset_id=7 if reset else None,
        dead=dead,
    )
    lookup = torch.randperm(200) % V  # raw vocabulary of 200 -> compressed
    for B, T, with_prefix in ((1, 1, True), (3, 9, True), (2, 6, False)):
        raw = torch.randint(0, 200, (B, T))
        raw[:, ::3] = int((lookup == 7).nonzero()[0])  # compressed to 7: the reset id
        prefix = torch.randint(0, V, (B, max_ngram - 1)) if with_prefix else None
        if dead:  # already-compressed ids with DEAD in them: no lookup
            ids = torch.randint(0, V, (B, T))
            ids[torch.rand(B, T) < 0.3] = DEAD
            ids[:, 1::4] = 7
            if prefix is not None:
                prefix[:, 0] = DEAD
            compressed, table = ids, None
        else:
            compressed, table = lookup[raw], lookup
            ids = raw
        rows, nxt = hasher.fused_step(ops, ids, table, prefix)
        for layer in hasher.layer_ids:
            want = hash_ngrams(
                compressed,
                getattr(hasher, f"mult_{layer}"),
                getattr(hasher, f"mod_{layer}"),
                pad_id=1,
                prefix=prefix,
                reset_id=hasher.reset_id,
                dead=dead,
            )
            assert torch.equal(rows[layer], want), (layer, B, T)
        assert torch.equal(nxt, hasher.next_prefix(prefix, compressed))


def test_hash_step_names_bad_input(ops) -> None:  # type: ignore[no-untyped-def]
    mult, mods = torch.tensor([[3, 5, 7]]), torch.tensor([[11, 13]])
    with pytest.raises(RuntimeError, match="token id 9 at position \\(0, 1\\) is out of range"):
        ops.hash_step(torch.tensor([[1, 9]]), torch.arange(5), None, mult, mods, 0, -1, False)
    with pytest.raises(RuntimeError, match="prefix must be \\[B, N-1\\]"):
        ops.hash_step(torch.tensor([[1]]), None, torch.zeros(1, 3).long(), mult, mods, 0, -1, False)
    with pytest.raises(RuntimeError, match="input_ids must be Long"):
        ops.hash_step(torch.tensor([[1.0]]), None, None, mult, mods, 0, -1, False)


# --- the Engram layer -----------------------------------------------------------------------


def fused_and_eager(engram, hidden, hash_ids, state=None, mask=None):  # type: ignore[no-untyped-def]
    """(fused call, PyTorch path) of one Engram forward, without autograd."""
    call = engram.fused_call()
    assert call is not None
    with torch.no_grad():
        got = call(hidden, hash_ids, state, mask)
        with kernels.enabled(False):
            want = engram(hidden, hash_ids, state, mask)
    return got, want


@pytest.mark.parametrize("hc_mult", [1, 4])
@pytest.mark.parametrize("gate", ["signed_sqrt", "plain", "none"])
@pytest.mark.parametrize("bias,short_conv", [(True, True), (False, True), (True, False)])
def test_engram_step_equals_the_pytorch_path(
    ops,  # type: ignore[no-untyped-def]
    tiny_engram: EngramConfig,
    hc_mult: int,
    gate: str,
    bias: bool,
    short_conv: bool,
) -> None:
    cfg = dataclasses.replace(
        tiny_engram, hc_mult=hc_mult, gate=gate, bias=bias, short_conv=short_conv
    )
    engram, hasher = make(cfg)
    if short_conv:
        randomise_conv(engram)
    with torch.no_grad():
        for norm in (engram.key_norm, engram.query_norm) + (
            (engram.short_conv.norm,) if short_conv else ()
        ):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
        engram.table.weight.mul_(30)
    ids = torch.randint(0, V, (3, 12))
    hidden = torch.randn(3, 12, hc_mult, 32)
    hash_ids = hasher(ids, 1)
    got, want = fused_and_eager(engram, hidden[:, :5], hash_ids[:, :5])  # prompt, no state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    state = got[1]
    for t in range(5, 12):  # then steps with the conv state carried, one with a mask
        mask = torch.tensor([True, False, True])[:, None] if t == 8 else None
        got, want = fused_and_eager(
            engram, hidden[:, t : t + 1], hash_ids[:, t : t + 1], state, mask
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        state = got[1]


@pytest.mark.parametrize("isa", [2, 1, 0])
def test_every_instruction_set_and_odd_shapes_give_the_same_layer(ops, isa: int) -> None:  # type: ignore[no-untyped-def]
    """The projection's AVX-512, AVX2 and plain paths (those this CPU has), on widths that
    leave remainders (21 outputs per key, E = 36) and 1, 3, 7 and 20 positions."""
    if isa > ops.set_isa(-1):
        pytest.skip(f"this CPU lacks instruction set level {isa}")
    cfg = EngramConfig(
        table_sizes=(301, 307),
        embed_dim_per_ngram=18,
        heads_per_ngram=2,
        layer_ids=(1,),
        hc_mult=2,
        pad_id=0,
    )
    hasher = NgramHasher.from_config(cfg, pad_id=0, compressed_vocab_size=V)
    engram = Engram(cfg, 21, hasher.moduli[1])
    randomise_conv(engram)
    try:
        assert ops.set_isa(isa) == isa
        for B, T in ((1, 1), (3, 1), (1, 7), (4, 5)):
            ids = torch.randint(0, V, (B, T))
            got, want = fused_and_eager(engram, torch.randn(B, T, 2, 21), hasher(ids, 1))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        ops.set_isa(-1)
    with pytest.raises(RuntimeError, match="supports instruction set level"):
        ops.set_isa(3)


@pytest.mark.parametrize("hc_mult,gate", [(1, "signed_sqrt"), (4, "signed_sqrt"), (2, "plain")])
def test_engram_step_matches_the_spec_reference(
    ops, tiny_engram: EngramConfig, hc_mult: int, gate: str
) -> None:  # type: ignore[no-untyped-def]
    """Against test_engram's position-by-position reference of SPEC §2.4-2.6, not our path."""
    cfg = dataclasses.replace(tiny_engram, hc_mult=hc_mult, gate=gate, kernel_size=4)
    engram, hasher = make(cfg)
    randomise_conv(engram)
    randomise_norms(engram)
    with torch.no_grad():
        engram.kv_proj.bias.normal_(0, 0.1)
        engram.table.weight.mul_(30)
    ids = torch.randint(0, V, (2, 11))
    hidden = torch.randn(2, 11, hc_mult, 32)
    hash_ids = hasher(ids, 1)
    call = engram.fused_call()
    with torch.no_grad():
        got, _ = call(hidden, hash_ids)
        residual, _ = call(hidden, hash_ids, residual=True)
    want = reference_forward(engram, hidden, hash_ids)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(residual, hidden + want)


def test_engram_step_reads_host_and_fp8_tables_through_their_lookup(
    ops, tiny_engram: EngramConfig
) -> None:  # type: ignore[no-untyped-def]
    """Tables the kernel cannot gather from are looked up by the table, then fused."""
    cfg = dataclasses.replace(tiny_engram, hc_mult=2, heads_per_ngram=2)  # 32-wide heads
    engram, hasher = make(cfg)
    randomise_conv(engram)
    rows, dim = engram.table.num_rows, engram.table.dim
    host = build_table(TablePlan(kind="host"), rows, dim, name="host")
    convert_table(engram.table, host)
    fp8_table = DeviceTable(rows, dim, dtype=fp8.FP8)
    values = (torch.randn(rows, dim) * 0.02).to(fp8.FP8)
    scales = torch.full((rows, dim // fp8.BLOCK), 0.5).to(fp8.E8M0)
    fp8_table.packed.copy_(fp8.pack_rows(values, scales))
    ids = torch.randint(0, V, (2, 4))
    hidden = torch.randn(2, 4, 2, 32)
    hash_ids = hasher(ids, 1)
    with torch.no_grad():
        want_host, _ = engram(hidden, hash_ids)
    for table, want in ((host, want_host), (fp8_table, None)):
        engram.table = table
        call = engram.fused_call()
        assert call is not None and call.lookup is not None
        with torch.no_grad():
            got, _ = call(hidden, hash_ids)
            if want is None:
                with kernels.enabled(False):
                    want, _ = engram(hidden, hash_ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_engram_step_names_bad_input(ops, tiny_engram: EngramConfig) -> None:  # type: ignore[no-untyped-def]
    engram, hasher = make(tiny_engram)
    call = engram.fused_call()
    hidden = torch.randn(1, 1, tiny_engram.hc_mult, 32)
    hash_ids = hasher(torch.tensor([[5]]), 1)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="hash_ids must be \\[B, T, H\\]"):
            call(hidden, hash_ids[..., :-1])
        with pytest.raises(RuntimeError, match="conv_state must be \\[B, M D"):
            call(hidden, hash_ids, torch.zeros(1, 3, 3))
        with pytest.raises(RuntimeError, match="hidden must be Float"):
            call(hidden.double(), hash_ids)
        bad = hash_ids.clone()
        bad[0, 0, 0] = 10**9
        with pytest.raises(RuntimeError, match="table row .* is out of range"):
            call(hidden, bad)


def test_forward_uses_the_kernel_only_where_it_can(ops, tiny_engram: EngramConfig) -> None:  # type: ignore[no-untyped-def]
    engram, hasher = make(tiny_engram)
    calls = []
    real = engram.fused_call

    def counting():  # type: ignore[no-untyped-def]
        calls.append(1)
        return real()

    engram.fused_call = counting  # type: ignore[method-assign]
    M = tiny_engram.hc_mult
    hidden = torch.randn(1, 3, M, 32)
    hash_ids = hasher(torch.randint(0, V, (1, 3)), 1)
    engram(hidden, hash_ids)  # autograd on: PyTorch
    with torch.no_grad():
        T = FUSED_ROWS // M + 1
        engram(torch.randn(1, T, M, 32), hasher(torch.randint(0, V, (1, T)), 1))  # too long
        with torch.autocast("cpu", dtype=torch.bfloat16):
            engram(hidden, hash_ids)  # autocast: PyTorch
        assert calls == []
        engram(hidden, hash_ids)
        assert calls == [1]
        engram.fused_call = real  # type: ignore[method-assign]
        engram.to(torch.bfloat16)
        assert engram.fused_call() is None  # bf16 weights: the kernel does not apply
        y, _ = engram(hidden.bfloat16(), hash_ids)  # and the PyTorch path runs it
    assert y.dtype == torch.bfloat16


# --- the model ------------------------------------------------------------------------------


def tiny_model(hc_mult: int, multi_branch: bool = True) -> EngramLM:
    cfg = ModelConfig(
        vocab_size=300,
        num_layers=3,
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        ffn_hidden_size=64,
        max_seq_len=64,
        hc_mult=hc_mult,
        engram=EngramConfig(
            table_sizes=(211, 223),
            embed_dim_per_ngram=16,
            heads_per_ngram=2,
            layer_ids=(0, 2),
            hc_mult=hc_mult,
            multi_branch=multi_branch,
            pad_id=0,
        ),
    )
    model = EngramLM(cfg).eval()
    with torch.no_grad():  # a conv that does something, rows that matter to the gate
        for block in model.layers:
            if block.engram is not None:
                block.engram.short_conv.weight.normal_(0, 0.5)
                block.engram.table.weight.mul_(30)
    return model


def step_logits(model: EngramLM, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    cache = model.new_cache()
    with torch.no_grad():
        out = [model(ids[:, :prompt], cache=cache).logits]
        for t in range(prompt, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], cache=cache).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("hc_mult,multi_branch", [(1, True), (4, True), (2, False)])
def test_fused_decoding_equals_the_pytorch_path_and_the_full_forward(
    ops, hc_mult: int, multi_branch: bool
) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(hc_mult, multi_branch)
    ids = torch.randint(0, 300, (2, 20))
    fused = step_logits(model, ids, prompt=6)
    with kernels.enabled(False):
        eager = step_logits(model, ids, prompt=6)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :3], cache=cache)
    layers = {b.layer_id for b in model.layers if b.engram is not None}
    assert set(cache.engram_calls) == (layers if multi_branch else set())


def test_greedy_generation_is_the_same_fused_or_not(ops) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(2)
    prompt = torch.randint(0, 300, (3, 5))
    fused = torch.stack(list(generate_tokens(model, prompt, 30, temperature=0)), 1)
    with kernels.enabled(False):
        eager = torch.stack(list(generate_tokens(model, prompt, 30, temperature=0)), 1)
    assert torch.equal(fused, eager)


def test_disabled_kernels_fall_back_and_a_failed_build_warns(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(1)
    with kernels.enabled(False):
        assert kernels.fused_ops() is None
        assert model.layers[0].engram.fused_call() is None
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.randint(0, 300, (1, 4)), cache=cache)
        assert cache.engram_calls is None  # the PyTorch path all along
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCE", broken)
    monkeypatch.setattr(kernels, "NAME", "engramlm_fused_broken_test")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.warns(RuntimeWarning, match="could not build the fused decode kernels"):
        assert kernels._build() is None
    assert "engramlm_fused_broken_test" in (kernels.build_error() or "")
    monkeypatch.setitem(kernels._state, "error", None)


def test_a_model_without_engram_never_asks_for_the_kernels(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    asked = []
    monkeypatch.setattr(kernels, "fused_ops", lambda: asked.append(1))
    cfg = dataclasses.replace(tiny_model(1).config, engram=None)
    model = EngramLM(cfg).eval()
    prompt = torch.randint(0, 300, (1, 4))
    assert len(list(generate_tokens(model, prompt, 3, temperature=0))) == 3
    assert asked == []
