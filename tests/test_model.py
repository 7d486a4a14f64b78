"""Backbone invariants: causality, decode == full forward, accounting, validation, balancing."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engramlm
from engramlm.config import EngramConfig, ModelConfig
from engramlm.model import (
    EngramLM,
    HyperConnections,
    MoE,
    allocate,
    model_stats,
    sinkhorn,
)
from engramlm.tokenization import CompressedVocab

SMALL_ENGRAM = EngramConfig.preset("tiny", table_sizes=(101, 103), layer_ids=(0, 2))


def small(name: str, **overrides: object) -> ModelConfig:
    """Presets with small Engram tables (layers 0 and 2), so the tests stay fast."""
    cfg = ModelConfig.preset(name, **overrides)
    if cfg.engram is not None:
        cfg = dataclasses.replace(
            cfg, engram=dataclasses.replace(SMALL_ENGRAM, hc_mult=cfg.hc_mult)
        )
    return cfg


CONFIGS = {
    "dense": small("tiny"),
    "moe": small("tiny-moe"),
    "engram": small("tiny-engram"),
    "mhc": small("tiny-mhc"),
    "dense-mhc-tied": small("tiny", hc_mult=2, tie_embeddings=True),
}


def build(cfg: ModelConfig, seed: int = 0) -> EngramLM:
    torch.manual_seed(seed)
    model = EngramLM(cfg).eval()
    # Non-zero short conv and HC dynamics, so the tests exercise their decode state.
    with torch.no_grad():
        for block in model.layers:
            if block.engram is not None:
                block.engram.short_conv.weight.normal_(std=0.3)
            for res in (block.attn_residual, block.ffn_residual):
                if isinstance(res, HyperConnections):
                    res.dynamic.normal_(std=0.5)
                    res.alpha.fill_(0.5)
    return model


def ids(cfg: ModelConfig, B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_is_causal(name: str) -> None:
    cfg = CONFIGS[name]
    model = build(cfg)
    x = ids(cfg, 2, 12)
    t = 6
    y = x.clone()
    y[:, t + 1] = (y[:, t + 1] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    if cfg.num_experts == 0:
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    else:
        # Exact up to float reassociation: the changed token joins other experts' groups, and
        # a matmul's rows can round differently with the group size (BLAS blocking).
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.equal(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("name", ["dense", "moe", "engram", "mhc"])
@pytest.mark.parametrize("prompt_len", [1, 5])  # shorter and longer than the n-gram order
def test_decode_matches_full_forward(name: str, prompt_len: int) -> None:
    cfg = CONFIGS[name]
    model = build(cfg)
    x = ids(cfg, 2, 11)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        steps = [model(x[:, :prompt_len], cache=cache).logits]
        t = prompt_len
        for n in (1, 3, 1):  # single and multi-token continuations
            steps.append(model(x[:, t : t + n], cache=cache).logits)
            t += n
        steps.append(model(x[:, t:], cache=cache).logits)
    assert cache.offset == x.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_precomputed_hash_ids_match_internal_hashing() -> None:
    cfg = CONFIGS["engram"]
    model = build(cfg)
    x = ids(cfg, 2, 9)
    with torch.no_grad():
        a = model(x).logits
        b = model(x, hash_ids=model.compute_hash_ids(x)).logits
    assert torch.equal(a, b)


def test_compressed_vocab_changes_hashing_not_embeddings() -> None:
    base = CONFIGS["engram"]
    lookup = np.arange(base.vocab_size, dtype=np.int64) // 2  # pairs of raw ids merge
    vocab = CompressedVocab(lookup, base.vocab_size // 2, "fp")
    cfg = dataclasses.replace(base, compressed_vocab_size=base.vocab_size // 2)
    model = EngramLM(cfg, vocab)
    x = torch.tensor([[4, 6, 8]])
    y = torch.tensor([[5, 7, 9]])  # same compressed ids
    for layer, rows in model.compute_hash_ids(x).items():
        assert torch.equal(rows, model.compute_hash_ids(y)[layer])
    with pytest.raises(ValueError, match="compressed_vocab_size"):
        EngramLM(base, vocab)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_accounting_equals_numel(name: str) -> None:
    cfg = CONFIGS[name]
    model = EngramLM(cfg)
    stats = model_stats(cfg)
    assert stats.total_params == sum(p.numel() for p in model.parameters())
    tables = sum(p.numel() for p in model.engram_table_parameters())
    assert stats.engram_table_params == tables
    dense = sum(p.numel() for p in model.dense_parameters())
    assert dense + tables == stats.total_params
    assert "P_act" in stats.format()


def test_active_params_count_top_k_experts() -> None:
    cfg = CONFIGS["moe"]
    stats = model_stats(cfg)
    n_moe = cfg.num_layers - cfg.first_dense_layers
    idle = n_moe * (cfg.num_experts - cfg.experts_per_token) * 3 * 64 * cfg.expert_hidden_size
    assert stats.sparse_params == idle


def test_dense_iso_flop_matches_activated_width_and_ignores_routing() -> None:
    from engramlm.compare import dense_iso_flop

    cfg = dataclasses.replace(CONFIGS["moe"], ffn_hidden_size=96)  # (2 top-k + 1 shared) x 32
    dense = dense_iso_flop(cfg)
    assert dense.num_experts == 0 and dense.ffn_hidden_size == 96
    assert model_stats(dense).flops_per_token == model_stats(cfg).flops_per_token - (
        2 * (cfg.num_layers - cfg.first_dense_layers) * cfg.hidden_size * cfg.num_experts
    )  # the routers are the only difference
    tuned = dataclasses.replace(cfg, moe_routed_scale=2.5, moe_bias_update_rate=1e-2)
    assert dense_iso_flop(tuned) == dense  # one dense model, however the routing was tuned


def test_dense_iso_param_holds_every_expert_in_each_ffn() -> None:
    from engramlm.compare import dense_iso_param

    cfg = dataclasses.replace(CONFIGS["moe"], ffn_hidden_size=96)
    wide = dense_iso_param(cfg)
    assert wide.num_experts == 0 and wide.first_dense_layers == cfg.num_layers
    moe_layers = cfg.num_layers - cfg.first_dense_layers
    # Each MoE layer's routed + shared experts, as one SwiGLU: 3 D x (E + s) F_e parameters.
    expert_params = 3 * cfg.hidden_size * (cfg.num_experts + cfg.num_shared_experts)
    expert_params *= cfg.expert_hidden_size
    wide_ffn = 3 * cfg.hidden_size * wide.ffn_hidden_size
    assert wide_ffn == expert_params
    routers = moe_layers * cfg.hidden_size * cfg.num_experts
    extra_first = cfg.first_dense_layers * (wide_ffn - 3 * cfg.hidden_size * 96)
    assert model_stats(wide).total_params == model_stats(cfg).total_params - routers + extra_first


def test_allocate_rho_one_is_pure_moe() -> None:
    cfg = CONFIGS["moe"]
    assert allocate(cfg, 1.0) == cfg
    assert allocate(cfg, 1.0).engram is None


def test_allocate_keeps_total_params_and_top_k() -> None:
    cfg = dataclasses.replace(CONFIGS["moe"], num_experts=16)
    shape = EngramConfig.preset("tiny", layer_ids=(1,))
    out = allocate(cfg, 0.8, engram=shape)
    base, new = model_stats(cfg), model_stats(out)
    assert out.num_experts == 16 - round(0.2 * 14)
    assert out.experts_per_token == cfg.experts_per_token
    assert abs(new.total_params - base.total_params) / base.total_params < 0.02
    # Iso-activation up to Engram's dense parts (activated) less the removed experts' router
    # rows (see allocate's docstring).
    n_moe = cfg.num_layers - cfg.first_dense_layers
    router_rows = (cfg.num_experts - out.num_experts) * n_moe * cfg.hidden_size
    assert new.active_params - base.active_params == new.engram_dense_params - router_rows


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(hidden_size=66), "hidden_size"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_experts=4, experts_per_token=5, expert_hidden_size=8), "experts_per_token"),
        (dict(num_experts=4, experts_per_token=1, expert_hidden_size=0), "expert_hidden_size"),
        (dict(experts_per_token=2), "experts_per_token"),
        (dict(first_dense_layers=3), "first_dense_layers"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(moe_routed_scale=0.0), "moe_routed_scale"),
        (dict(norm_eps=-1.0), "norm_eps"),
        (dict(hc_mult=0), "hc_mult"),
        (dict(compressed_vocab_size=10_000), "compressed_vocab_size"),
        (dict(engram=EngramConfig.preset("tiny", layer_ids=(5,))), "engram.layer_ids"),
        (dict(engram=EngramConfig.preset("tiny", hc_mult=4)), "engram.hc_mult"),
    ],
)
def test_config_validation_names_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        ModelConfig(**overrides)


def test_config_round_trips_through_dict() -> None:
    for cfg in CONFIGS.values():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="known"):
        ModelConfig.preset("huge")


def test_moe_bias_update_balances_load() -> None:
    torch.manual_seed(0)
    moe = MoE(ModelConfig.preset("tiny-moe"))
    with torch.no_grad():
        moe.router.weight.normal_(std=0.02)
        moe.router.weight[0] += 0.5  # expert 0 attracts most tokens
    x = torch.randn(1, 256, 64).abs()

    def imbalance() -> float:
        moe.expert_counts.zero_()
        with torch.no_grad():
            moe(x)
        load = moe.expert_load().float()
        return float(load.max() / load.mean())

    before = imbalance()
    for _ in range(40):
        with torch.no_grad():
            moe(x)
        moe.update_bias(rate=0.02)
    assert imbalance() < before


def test_sinkhorn_is_doubly_stochastic() -> None:
    m = sinkhorn(torch.randn(5, 4, 4), iters=20)
    torch.testing.assert_close(m.sum(-1), torch.ones(5, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(m.sum(-2), torch.ones(5, 4), atol=1e-4, rtol=0)


def test_hyper_connections_start_as_plain_residual() -> None:
    torch.manual_seed(0)
    hc = HyperConnections(8, 4, eps=1e-6)
    x = torch.randn(2, 3, 8)
    streams = x.unsqueeze(2).expand(2, 3, 4, 8)
    out = hc(streams, torch.tanh)
    torch.testing.assert_close(out, (x + torch.tanh(x)).unsqueeze(2).expand_as(out))


def test_engram_init_follows_design() -> None:
    """Table from the backend (TABLE_INIT_STD), W_V as an output projection, conv zero."""
    from engramlm.tables.base import TABLE_INIT_STD

    model = EngramLM(CONFIGS["engram"])
    out_std = 0.02 / (2 * model.config.num_layers) ** 0.5
    engrams = [b.engram for b in model.layers if b.engram is not None]
    assert engrams
    for engram in engrams:
        table_std = float(engram.table.weight.detach().std())
        assert abs(table_std - TABLE_INIT_STD) < 0.1 * TABLE_INIT_STD
        value = engram.kv_proj.weight.detach()[engram.value_rows]
        keys = engram.kv_proj.weight.detach()[: engram.value_rows.start]
        assert abs(float(value.std()) - out_std) < 0.2 * out_std
        assert abs(float(keys.std()) - 0.02) < 0.2 * 0.02
        assert not engram.kv_proj.bias.any() and not engram.short_conv.weight.any()


def test_model_imports_no_distributed() -> None:
    src = Path(engramlm.__file__).parent
    for name in ("model.py", "engram.py"):
        assert "torch.distributed" not in (src / name).read_text()


def test_bf16_autocast_gives_bf16_logits_and_a_loss_within_0p1_percent_of_fp32() -> None:
    """Under bf16 autocast the logits are bf16 and the loss stays within 0.1% of fp32's (bf16
    rounds to 2^-9 ~ 0.2% per value, but the loss is a mean in fp32; measured 3e-5 here)."""
    cfg = CONFIGS["mhc"]
    model = build(cfg)
    x = ids(cfg, 2, 7)
    with torch.no_grad():
        fp32 = model(x, targets=x.roll(-1, dims=1)).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, targets=x.roll(-1, dims=1))
    assert out.logits.dtype == torch.bfloat16
    assert out.loss != fp32  # autocast took effect
    torch.testing.assert_close(out.loss, fp32, rtol=1e-3, atol=0)


def test_out_of_range_id_names_position() -> None:
    cfg = CONFIGS["dense"]
    model = build(cfg)
    x = ids(cfg, 2, 5)
    x[1, 3] = cfg.vocab_size
    with pytest.raises(ValueError, match=re.escape("(1, 3)")):
        model(x)


def test_empty_batch_and_sequence() -> None:
    cfg = CONFIGS["engram"]
    model = build(cfg)
    for B, T in ((0, 4), (2, 0)):
        x = torch.zeros(B, T, dtype=torch.int64)
        out = model(x, targets=x)
        assert out.logits.shape == (B, T, cfg.vocab_size)


def test_loss_is_the_mean_over_unmasked_targets_and_backpropagates() -> None:
    """-100 targets drop out of the mean: the loss equals the hand-computed mean token
    cross-entropy over the kept positions, whatever the logits at the ignored ones."""
    cfg = CONFIGS["engram"]
    model = build(cfg).train()
    x = ids(cfg, 2, 8)
    targets = x.roll(-1, dims=1)
    targets[:, :4] = -100
    out = model(x, targets=targets)
    assert out.loss is not None
    logp = out.logits.detach().float().log_softmax(-1)  # [B, T, V]
    kept = targets != -100
    want = -logp[kept].gather(-1, targets[kept][:, None]).mean()
    everywhere = -logp.gather(-1, x.roll(-1, dims=1)[..., None]).mean()
    assert not torch.allclose(want, everywhere)  # ignoring must change the value
    torch.testing.assert_close(out.loss.detach(), want)
    out.loss.backward()
    assert all(p.grad is not None for p in model.engram_table_parameters())


def test_sequence_longer_than_max_seq_len_raises() -> None:
    cfg = CONFIGS["dense"]
    model = build(cfg)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids(cfg, 1, cfg.max_seq_len + 1))


def test_meta_device_build_then_init_matches_constants() -> None:
    cfg = CONFIGS["mhc"]
    ref = EngramLM(cfg)
    with torch.device("meta"):
        model = EngramLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    for (name, got), want in zip(model.named_buffers(), ref.buffers(), strict=True):
        assert torch.equal(got, want), name


# ---------------------------------------------------------------------------------------------
# References: each part of the backbone against an implementation that is not ours


def _llama_names(num_layers: int) -> dict[str, str]:
    """Our state-dict keys -> transformers' LlamaForCausalLM keys."""
    names = {
        "embed.weight": "model.embed_tokens.weight",
        "final_norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    pairs = [
        ("attn.q_proj", "self_attn.q_proj"),
        ("attn.k_proj", "self_attn.k_proj"),
        ("attn.v_proj", "self_attn.v_proj"),
        ("attn.o_proj", "self_attn.o_proj"),
        ("ffn.gate_proj", "mlp.gate_proj"),
        ("ffn.up_proj", "mlp.up_proj"),
        ("ffn.down_proj", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ]
    for i in range(num_layers):
        for ours, theirs in pairs:
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_dense_preset_matches_transformers_llama(tie_embeddings: bool) -> None:
    """The dense backbone is Llama: GQA + RoPE (rotate-half pairs), pre-RMSNorm, SwiGLU, no
    biases. transformers' LlamaForCausalLM (eager attention) with the same weights, the same
    norm eps, RoPE theta and tying gives the same logits (within 1e-5, fp32) over 200
    positions. Non-unit norm weights, so a misplaced norm scale shows."""
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.preset("tiny", tie_embeddings=tie_embeddings)
    torch.manual_seed(0)
    ours = EngramLM(cfg).eval()
    with torch.no_grad():  # weights large enough that every nonlinearity matters
        for name, p in ours.named_parameters():
            p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.15)
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    config._attn_implementation = "eager"  # the plain softmax(QK^T/sqrt(d))V reference
    llama = transformers.LlamaForCausalLM(config).eval()
    names = _llama_names(cfg.num_layers)
    state = {names[k]: v for k, v in ours.state_dict().items() if k != "compress_lookup"}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    x = ids(cfg, 2, 200)
    with torch.no_grad():
        # RoPE angles: ours are computed in float64, transformers' in fp32, which moves its
        # logits by ~1e-5 per 100 positions here; take its tables to compare the rest exactly.
        cos, sin = llama.model.rotary_emb(ours.embed.weight, torch.arange(200)[None])
        half = cfg.head_dim // 2
        ours.rope_cos[:200], ours.rope_sin[:200] = cos[0, :, :half], sin[0, :, :half]
        got, want = ours(x).logits, llama(x).logits
    assert float(want.std()) > 1.0  # not a near-constant output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _reference_moe(
    moe: MoE, x: torch.Tensor, num_shared: int, routed_scale: float = 1.0
) -> torch.Tensor:
    """DeepSeek-V3 routing, one token at a time (arXiv 2412.19437 §2.1.2, 2408.15664):
    s_i = sigmoid(u . e_i); top-k by s_i + b_i (the bias selects only); g_i = s_i / sum of the
    chosen s, times V3's routed scaling factor; output = sum_i g_i FFN_i(u) + sum over shared
    experts FFN_s(u). The shared experts are the fused SwiGLU cut back into ``num_shared``
    experts of their own."""

    def swiglu(u: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        return down @ (F.silu(gate @ u) * (up @ u))

    shared = moe.shared
    width = moe.gate_proj.shape[1]
    out = torch.zeros_like(x)
    for s, u in enumerate(x):  # [D]
        scores = torch.sigmoid(moe.router.weight @ u)  # [E]
        chosen = sorted(
            range(moe.num_experts), key=lambda i: -float(scores[i] + moe.expert_bias[i])
        )[: moe.top_k]
        total = sum(float(scores[i]) for i in chosen)
        for i in chosen:
            y = swiglu(u, moe.gate_proj[i], moe.up_proj[i], moe.down_proj[i])
            out[s] += routed_scale * float(scores[i]) / total * y
        for j in range(num_shared):
            cut = slice(j * width, (j + 1) * width)
            out[s] += swiglu(
                u,
                shared.gate_proj.weight[cut],
                shared.up_proj.weight[cut],
                shared.down_proj.weight[:, cut],
            )
    return out


@pytest.mark.parametrize("routed_scale", [1.0, 2.5])
def test_moe_matches_a_per_token_loop(routed_scale: float) -> None:
    cfg = ModelConfig.preset("tiny-moe", num_shared_experts=2, moe_routed_scale=routed_scale)
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.2)
        moe.expert_bias.normal_(0.0, 0.5)  # large enough to change some selections
    x = torch.randn(3, 7, cfg.hidden_size)
    flat = x.reshape(-1, cfg.hidden_size)
    with torch.no_grad():
        got = moe(x).reshape(-1, cfg.hidden_size)
        want = _reference_moe(moe, flat, cfg.num_shared_experts, routed_scale)
        by_score = torch.topk(torch.sigmoid(flat @ moe.router.weight.T), moe.top_k).indices
        experts, _ = moe.route(flat)
    assert not torch.equal(by_score.sort().values, experts.sort().values)  # the bias selects
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _reference_hyper_connection(
    hc: HyperConnections, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """mHC (arXiv 2512.24880) per token, from the equations: with x_l [n, C] and its flattened,
    RMS-normalised copy x' = RMSNorm(vec(x_l)) [1, nC],

        H~pre = a_pre (x' phi_pre) + b_pre,   H~post = a_post (x' phi_post) + b_post,
        H~res = a_res mat(x' phi_res) + b_res,
        H_pre = sigmoid(H~pre),  H_post = 2 sigmoid(H~post),  H_res = SK(H~res),
        x_{l+1} = H_res x_l + H_post^T F(H_pre x_l),

    where SK is Sinkhorn-Knopp from exp(H~res), 20 alternating row and column normalisations
    (t_max = 20). phi_pre, phi_post, phi_res are our fused ``dynamic`` weight's row blocks
    (our layout); the RMSNorm has no weight (our documented simplification)."""
    B, T, n, C = x.shape
    phi = hc.dynamic.T  # [nC, n*n + 2n]
    phi_pre, phi_post, phi_res = phi[:, :n], phi[:, n : 2 * n], phi[:, 2 * n :]
    a_pre, a_post, a_res = (float(a) for a in hc.alpha)
    out = torch.empty_like(x)
    for b in range(B):
        for t in range(T):
            xl = x[b, t]  # [n, C]
            v = xl.reshape(1, n * C)
            v = v / torch.sqrt(v.pow(2).mean() + hc.eps)
            h_pre = torch.sigmoid(a_pre * (v @ phi_pre) + hc.bias_pre)  # [1, n]
            h_post = 2 * torch.sigmoid(a_post * (v @ phi_post) + hc.bias_post)  # [1, n]
            m = torch.exp(a_res * (v @ phi_res).reshape(n, n) + hc.bias_res)  # [n, n]
            for _ in range(20):
                m = m / m.sum(dim=1, keepdim=True)
                m = m / m.sum(dim=0, keepdim=True)
            y = f((h_pre @ xl).unsqueeze(0)).squeeze(0)  # [1, C]
            out[b, t] = m @ xl + h_post.T @ y
    return out


def test_hyper_connections_match_the_paper_equations() -> None:
    torch.manual_seed(0)
    hc = HyperConnections(8, 4, eps=1e-6)
    with torch.no_grad():  # away from the plain-residual initialisation
        hc.dynamic.normal_(0.0, 0.5)
        hc.alpha.copy_(torch.tensor([0.7, 0.5, 0.9]))
        hc.bias_pre.normal_()
        hc.bias_post.normal_()
        hc.bias_res.normal_()
    weight = torch.randn(8, 8) * 0.5
    f = lambda u: torch.tanh(u @ weight)  # noqa: E731  a sublayer [.., C] -> [.., C]
    streams = torch.randn(2, 5, 4, 8)
    with torch.no_grad():
        got = hc(streams, f)
        want = _reference_hyper_connection(hc, streams, f)
        plain = streams + f(streams.mean(dim=2)).unsqueeze(2)
    assert not torch.allclose(got, plain, atol=1e-2)  # the maps are far from a plain residual
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
