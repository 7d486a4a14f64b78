"""The Engram layer (SPEC §2.4-2.8): reference, invariants, gradients, dtypes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from engramlm import DeviceTable, Engram, EngramConfig, NgramHasher, context_gate

V = 97  # compressed vocabulary of these tests


def make(cfg: EngramConfig, hidden: int = 32) -> tuple[Engram, NgramHasher]:
    hasher = NgramHasher.from_config(
        cfg,
        pad_id=cfg.pad_id,
        compressed_vocab_size=V,
    )
    return Engram(cfg, hidden, hasher.moduli[cfg.layer_ids[0]]), hasher


def randomise_conv(engram: Engram) -> None:
    with torch.no_grad():
        engram.short_conv.weight.normal_(0, 0.5)


def randomise_norms(engram: Engram) -> None:
    """Non-unit RMSNorm weights, so a reference that forgot one would disagree."""
    with torch.no_grad():
        for norm in (engram.key_norm, engram.query_norm, engram.short_conv.norm):
            norm.weight.uniform_(0.5, 1.5)


# The spec's constants (SPEC §2.5-2.6, the demo), not read from the module under test.
SPEC_KERNEL, SPEC_GATE_CLAMP, SPEC_CONV_NORM_EPS = 4, 1e-6, 1e-5


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean() + eps)


@torch.no_grad()
def reference_forward(engram: Engram, hidden: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
    """SPEC §2.4-2.6 written position by position: slow and obviously right.

    The per-branch maps are read out of the fused projection by their definition (rows of
    W_K^(m) for branch m, then W_V); kernel 4, dilation N and the norms' eps are the spec's.
    """
    cfg = engram.config
    B, T, M, D = hidden.shape
    w = engram.table.weight
    W, bias = engram.kv_proj.weight, engram.kv_proj.bias
    W_K = [W[m * D : (m + 1) * D] for m in range(M)]
    b_K = [bias[m * D : (m + 1) * D] for m in range(M)]
    W_V, b_V = W[M * D :], bias[M * D :]
    gate_eps = torch.finfo(hidden.dtype).eps  # the demo's nn.RMSNorm default
    out = torch.zeros_like(hidden)
    u = torch.zeros_like(hidden)
    for b in range(B):
        for t in range(T):
            rows = [int(hash_ids[b, t, h]) + int(engram.offsets[h]) for h in range(cfg.num_heads)]
            e = torch.cat([w[r] for r in rows])  # [E]
            v = W_V @ e + b_V
            for m in range(M):
                k = W_K[m] @ e + b_K[m]
                qn = rms(hidden[b, t, m], gate_eps) * engram.query_norm.weight[m]
                kn = rms(k, gate_eps) * engram.key_norm.weight[m]
                s = float(qn @ kn) / math.sqrt(D)
                if cfg.gate == "signed_sqrt":
                    s = math.copysign(math.sqrt(max(abs(s), SPEC_GATE_CLAMP)), s)
                u[b, t, m] = v / (1 + math.exp(-s))
    conv = engram.short_conv
    dilation = cfg.max_ngram  # SPEC §2.6: delta = N
    normed = torch.zeros_like(u)
    for b in range(B):
        for t in range(T):
            for m in range(M):
                normed[b, t, m] = rms(u[b, t, m], SPEC_CONV_NORM_EPS) * conv.norm.weight[m]
    filt = conv.weight.view(M, D, SPEC_KERNEL)
    for t in range(T):
        acc = torch.zeros(B, M, D)
        for i in range(SPEC_KERNEL):
            src = t - (SPEC_KERNEL - 1 - i) * dilation
            if src >= 0:
                acc += filt[:, :, i] * normed[:, src]
        out[:, t] = u[:, t] + F.silu(acc)
    return out


@pytest.mark.parametrize("hc_mult,gate", [(1, "signed_sqrt"), (4, "signed_sqrt"), (2, "plain")])
def test_engram_matches_reference(tiny_engram: EngramConfig, hc_mult: int, gate: str) -> None:
    cfg = dataclasses.replace(tiny_engram, hc_mult=hc_mult, gate=gate, kernel_size=SPEC_KERNEL)
    engram, hasher = make(cfg)
    randomise_conv(engram)
    randomise_norms(engram)
    with torch.no_grad():
        engram.kv_proj.bias.normal_(0, 0.1)
        engram.table.weight.mul_(30)  # conv inputs of mean square ~1e-3: eps matters there
    ids = torch.randint(0, V, (2, 11))
    hidden = torch.randn(2, 11, hc_mult, 32)
    hash_ids = hasher(ids, 1)
    got, _ = engram(hidden, hash_ids)
    torch.testing.assert_close(got, reference_forward(engram, hidden, hash_ids))


def test_conv_norm_uses_the_demos_eps(tiny_engram: EngramConfig) -> None:
    """The short conv's RMSNorm has eps 1e-5 (the demo's), not torch's default: on inputs of
    mean square ~1e-6 (small table init) the two differ by ~10%."""
    engram, _ = make(tiny_engram)
    u = torch.full((1, 1, 1, 32), 1e-3)
    expected = u * torch.rsqrt(u.pow(2).mean() + SPEC_CONV_NORM_EPS)
    torch.testing.assert_close(engram.short_conv.norm(u), expected)
    assert float(engram.short_conv.norm(u).detach().abs().max()) < 0.35  # default eps: ~1


def test_zero_init_conv_returns_gated_value(tiny_engram: EngramConfig) -> None:
    engram, hasher = make(dataclasses.replace(tiny_engram, hc_mult=2))
    hidden = torch.randn(2, 7, 2, 32)
    hash_ids = hasher(torch.randint(0, V, (2, 7)), 1)
    y, _ = engram(hidden, hash_ids)
    e = engram.retrieve(hash_ids)
    W, bias = engram.kv_proj.weight, engram.kv_proj.bias
    v = e @ W[64:].T + bias[64:]  # rows of W_V after the two keys
    k1 = e @ W[32:64].T + bias[32:64]  # W_K^(1)
    alpha = context_gate(
        F.rms_norm(hidden[:, :, 1], (32,)) * engram.query_norm.weight[1],
        F.rms_norm(k1, (32,)) * engram.key_norm.weight[1],
    )
    torch.testing.assert_close(y[:, :, 1], alpha * v)


def test_mask_zeroes_the_gated_value_of_masked_positions(tiny_engram: EngramConfig) -> None:
    engram, hasher = make(dataclasses.replace(tiny_engram, hc_mult=2))
    hidden = torch.randn(1, 9, 2, 32)
    hash_ids = hasher(torch.randint(0, V, (1, 9)), 1)
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 3] = False
    y, _ = engram(hidden, hash_ids, mask=mask)  # zero conv: Y = U
    full, _ = engram(hidden, hash_ids)
    assert not y[0, 3].any() and full[0, 3].abs().sum() > 0
    torch.testing.assert_close(y[0, [0, 1, 2, 4, 5, 6, 7, 8]], full[0, [0, 1, 2, 4, 5, 6, 7, 8]])
    randomise_conv(engram)  # taps at t, t-3, t-6, t-9: only position 6 reads position 3
    y, _ = engram(hidden, hash_ids, mask=mask)
    full, _ = engram(hidden, hash_ids)
    torch.testing.assert_close(y[0, [4, 5, 7, 8]], full[0, [4, 5, 7, 8]])
    assert not torch.allclose(y[0, 6], full[0, 6])


def test_per_branch_checkpoints_load_into_the_fused_layout(tiny_engram: EngramConfig) -> None:
    """A state dict of the earlier layout (key_projs.m, value_proj, key/query_norms.m,
    short_conv.norms.m) loads, and the layer computes the same function."""
    engram, hasher = make(dataclasses.replace(tiny_engram, hc_mult=2))
    randomise_conv(engram)
    randomise_norms(engram)
    legacy = {k: v for k, v in engram.state_dict().items() if not k.startswith(("kv_", "key_n"))}
    legacy = {k: v for k, v in legacy.items() if not k.startswith(("query_n", "short_conv.n"))}
    W, bias = engram.kv_proj.weight.detach(), engram.kv_proj.bias.detach()
    for m in range(2):
        legacy[f"key_projs.{m}.weight"] = W[m * 32 : (m + 1) * 32].clone()
        legacy[f"key_projs.{m}.bias"] = bias[m * 32 : (m + 1) * 32].clone()
        legacy[f"key_norms.{m}.weight"] = engram.key_norm.weight[m].detach().clone()
        legacy[f"query_norms.{m}.weight"] = engram.query_norm.weight[m].detach().clone()
        legacy[f"short_conv.norms.{m}.weight"] = engram.short_conv.norm.weight[m].detach().clone()
    legacy["value_proj.weight"], legacy["value_proj.bias"] = W[64:].clone(), bias[64:].clone()
    fresh, _ = make(dataclasses.replace(tiny_engram, hc_mult=2))
    fresh.load_state_dict(legacy)
    hidden, hash_ids = torch.randn(1, 6, 2, 32), hasher(torch.randint(0, V, (1, 6)), 1)
    torch.testing.assert_close(fresh(hidden, hash_ids)[0], engram(hidden, hash_ids)[0])


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_engram_is_causal(tiny_engram: EngramConfig, hc_mult: int) -> None:
    engram, hasher = make(dataclasses.replace(tiny_engram, hc_mult=hc_mult))
    randomise_conv(engram)
    ids = torch.randint(0, V, (1, 16))
    hidden = torch.randn(1, 16, hc_mult, 32)
    base, _ = engram(hidden, hasher(ids, 1))
    for t in (0, 5, 15):
        ids2, hidden2 = ids.clone(), hidden.clone()
        ids2[0, t] = (ids2[0, t] + 1) % V
        hidden2[0, t] += 1.0
        out, _ = engram(hidden2, hasher(ids2, 1))
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.equal(out[:, t], base[:, t])


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_output_shape_follows_branches(tiny_engram: EngramConfig, hc_mult: int) -> None:
    engram, hasher = make(dataclasses.replace(tiny_engram, hc_mult=hc_mult))
    y, state = engram(torch.randn(3, 5, hc_mult, 32), hasher(torch.randint(0, V, (3, 5)), 1))
    assert y.shape == (3, 5, hc_mult, 32)
    assert state.shape == (3, hc_mult * 32, engram.short_conv.receptive_field)


def test_decode_state_matches_full_forward(tiny_engram: EngramConfig) -> None:
    engram, hasher = make(dataclasses.replace(tiny_engram, hc_mult=2))
    randomise_conv(engram)
    ids = torch.randint(0, V, (2, 14))
    hidden = torch.randn(2, 14, 2, 32)
    full, _ = engram(hidden, hasher(ids, 1))
    prefix, state, steps = None, None, []
    for t in range(14):
        y, state = engram(hidden[:, t : t + 1], hasher(ids[:, t : t + 1], 1, prefix), state)
        prefix = hasher.next_prefix(prefix, ids[:, t : t + 1])
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_only_looked_up_rows_get_gradients(tiny_engram: EngramConfig, sparse: bool) -> None:
    cfg = tiny_engram
    hasher = make(cfg)[1]
    mods = hasher.moduli[1]
    engram = Engram(cfg, 32, mods, table=DeviceTable(sum(mods), cfg.head_dim, sparse_grad=sparse))
    hash_ids = hasher(torch.randint(0, V, (2, 9)), 1)
    y, _ = engram(torch.randn(2, 9, 1, 32), hash_ids)
    y.square().sum().backward()
    grad = engram.table.weight.grad
    assert grad.is_sparse == sparse
    grad = grad.to_dense()
    touched = set(engram.global_rows(hash_ids).flatten().tolist())
    nonzero = set(grad.abs().sum(-1).nonzero().flatten().tolist())
    assert nonzero == touched


def test_bf16_output_close_to_fp32(tiny_engram: EngramConfig) -> None:
    engram, hasher = make(dataclasses.replace(tiny_engram, hc_mult=2))
    randomise_conv(engram)
    hidden = torch.randn(2, 9, 2, 32)
    hash_ids = hasher(torch.randint(0, V, (2, 9)), 1)
    y32, _ = engram(hidden, hash_ids)
    y16, _ = engram.to(torch.bfloat16)(hidden.bfloat16(), hash_ids)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("autocast", [False, True])
def test_gates_equal_the_norms_written_out(tiny_engram: EngramConfig, autocast: bool) -> None:
    """The gate folds both RMSNorms into its dot product; it equals normalising h and k with
    the norm modules and calling ``context_gate``, for keys small enough that the norms' eps
    matters, and under bf16 autocast (bf16 keys, fp32 residual stream; the default eps is
    fp32's there too)."""
    engram, hasher = make(dataclasses.replace(tiny_engram, hc_mult=2))
    randomise_norms(engram)
    with torch.no_grad():
        engram.table.weight.mul_(0.05)  # keys' mean square ~1e-6: a bf16 eps would show
    hidden = torch.randn(2, 9, 2, 32)
    hash_ids = hasher(torch.randint(0, V, (2, 9)), 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        kv = engram.kv_proj(engram.retrieve(hash_ids))
        keys = kv[..., : engram.value_rows.start].unflatten(-1, (2, 32))
        expected = context_gate(engram.query_norm(hidden), engram.key_norm(keys)).to(kv.dtype)
        got = engram.gates(hidden, hash_ids)
    assert got.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(got, expected.squeeze(-1))


def test_hidden_with_wrong_branch_count_is_refused(tiny_engram: EngramConfig) -> None:
    engram, hasher = make(tiny_engram)
    with pytest.raises(ValueError, match="hc_mult=1"):
        engram(torch.randn(1, 4, 2, 32), hasher(torch.randint(0, V, (1, 4)), 1))


def test_table_of_wrong_shape_is_refused(tiny_engram: EngramConfig) -> None:
    mods = make(tiny_engram)[1].moduli[1]
    with pytest.raises(ValueError, match="sum of head primes"):
        Engram(tiny_engram, 32, mods, table=DeviceTable(sum(mods) - 1, tiny_engram.head_dim))


def test_empty_sequence_gives_empty_output(tiny_engram: EngramConfig) -> None:
    engram, hasher = make(tiny_engram)
    y, _ = engram(torch.randn(2, 0, 1, 32), hasher(torch.zeros(2, 0, dtype=torch.long), 1))
    assert y.shape == (2, 0, 1, 32)
