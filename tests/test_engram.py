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


SPEC_KERNEL = 4  # SPEC §2.6: kernel w = 4
SPEC_DILATION = 3  # SPEC §2.6: dilation delta = N = 3 (max n-gram order)


def randomise_conv(engram: Engram) -> None:
    with torch.no_grad():
        engram.short_conv.weight.normal_(0, 0.5)


def randomise_norms(engram: Engram) -> None:
    """Non-unit RMSNorm weights (they start at 1), so a dropped or misplaced scale shows."""
    with torch.no_grad():
        for module in engram.modules():
            if isinstance(module, torch.nn.RMSNorm):
                module.weight.normal_(1.0, 0.5)


def rms_norm(x: torch.Tensor, norm: torch.nn.RMSNorm) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight; eps (not in the SPEC) is the module's."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight


@torch.no_grad()
def reference_forward(engram: Engram, hidden: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
    """SPEC §2.4-2.6 written position by position: slow and obviously right. The conv's kernel
    and dilation are the SPEC's constants, not the module's."""
    cfg = engram.config
    B, T, M, D = hidden.shape
    w = engram.table.weight
    out = torch.zeros_like(hidden)
    u = torch.zeros_like(hidden)
    for b in range(B):
        for t in range(T):
            rows = [int(hash_ids[b, t, h]) + int(engram.offsets[h]) for h in range(cfg.num_heads)]
            e = torch.cat([w[r] for r in rows])  # [E]
            v = engram.value_proj.weight @ e + engram.value_proj.bias
            for m in range(M):
                k = engram.key_projs[m].weight @ e + engram.key_projs[m].bias
                qn = rms_norm(hidden[b, t, m], engram.query_norms[m])
                kn = rms_norm(k, engram.key_norms[m])
                s = float(qn @ kn) / math.sqrt(D)
                if cfg.gate == "signed_sqrt":
                    s = math.copysign(math.sqrt(max(abs(s), 1e-6)), s)
                u[b, t, m] = v / (1 + math.exp(-s))
    conv = engram.short_conv
    normed = torch.stack([rms_norm(u[:, :, m], conv.norms[m]) for m in range(M)], dim=2)
    filt = conv.weight.view(M, D, SPEC_KERNEL)  # [M*D, 1, w] depthwise filters
    for t in range(T):
        acc = torch.zeros(B, M, D)
        for i in range(SPEC_KERNEL):  # tap i reads position t - (w - 1 - i) * delta
            src = t - (SPEC_KERNEL - 1 - i) * SPEC_DILATION
            if src >= 0:
                acc += filt[:, :, i] * normed[:, src]
        out[:, t] = u[:, t] + F.silu(acc)
    return out


@pytest.mark.parametrize("hc_mult,gate", [(1, "signed_sqrt"), (4, "signed_sqrt"), (2, "plain")])
def test_engram_matches_reference(tiny_engram: EngramConfig, hc_mult: int, gate: str) -> None:
    cfg = dataclasses.replace(tiny_engram, hc_mult=hc_mult, gate=gate)
    assert (cfg.kernel_size, cfg.max_ngram) == (SPEC_KERNEL, SPEC_DILATION)  # the SPEC's conv
    engram, hasher = make(cfg)
    randomise_conv(engram)
    randomise_norms(engram)
    ids = torch.randint(0, V, (2, 11))
    hidden = torch.randn(2, 11, hc_mult, 32)
    hash_ids = hasher(ids, 1)
    got, _ = engram(hidden, hash_ids)
    torch.testing.assert_close(got, reference_forward(engram, hidden, hash_ids))


def test_zero_init_conv_returns_gated_value(tiny_engram: EngramConfig) -> None:
    engram, hasher = make(dataclasses.replace(tiny_engram, hc_mult=2))
    hidden = torch.randn(2, 7, 2, 32)
    hash_ids = hasher(torch.randint(0, V, (2, 7)), 1)
    y, _ = engram(hidden, hash_ids)
    e = engram.retrieve(hash_ids)
    v = engram.value_proj(e)
    alpha = context_gate(
        engram.query_norms[1](hidden[:, :, 1]), engram.key_norms[1](engram.key_projs[1](e))
    )
    torch.testing.assert_close(y[:, :, 1], alpha * v)


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
