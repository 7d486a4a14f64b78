"""The decoder-only backbone around Engram: attention, FFN/MoE, hyper-connections, LM head.

Shapes: B batch, T time, M residual streams (hc_mult), D model width, H = (N-1)K hash heads,
V vocabulary, S tokens in a flattened batch (B*T).

One block (SPEC §2.7, §2.8), on M residual streams h [B, T, M, D]:

    h = h + Engram(h, hash_ids)                 (Engram layers only, before attention/FFN)
    h = HC_attn(h, x -> Attention(RMSNorm(x)))  (M = 1: h + Attention(RMSNorm(h)))
    h = HC_ffn(h,  x -> FFN(RMSNorm(x)))        (FFN: dense SwiGLU or MoE)

Attention is GQA with RoPE (the paper uses MLA; SPEC §6 allows a standard backbone). The
model imports torch and engramlm only: parallelism is applied from outside (STYLE.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engramlm import kernels
from engramlm.config import EngramConfig, ModelConfig
from engramlm.engram import FUSED_ROWS, Engram, fusable, head_offsets
from engramlm.hashing import NgramHasher, check_ids, head_moduli
from engramlm.kernels import FusedEngram
from engramlm.overencoding import OverEncoding, overencoding_moduli
from engramlm.tables import Table, TablePlan, build_table
from engramlm.tokenization import CompressedVocab

# --------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of RoPE angles, [max_seq_len, head_dim / 2] each (fp32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + hd/2) of x [B, h, T, hd] by the angles cos/sin [T, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)  # [B, h, T, hd/2] each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)  # the fp32 tables must not promote bf16 activations


# --------------------------------------------------------------------------------------------
# Incremental decoding state
# --------------------------------------------------------------------------------------------


@dataclass
class DecodeCache:
    """Everything a step of incremental decoding needs from the tokens already seen.

    ``keys``/``values``: per layer, the RoPE'd attention keys/values [B, kv_heads, offset, hd].
    ``hash_prefix``: the last N-1 *compressed* ids [B, N-1] (pad-filled), the hashing prefix of
    SPEC §2.2 (shared by all Engram layers: the ids do not depend on the layer).
    ``conv_states``: per Engram layer, the ShortConv state [B, M*D, (w-1)N] (SPEC §2.6).
    ``overencoding_prefix``: Over-Encoding's hashing prefix, the last N-1 *raw* ids [B, N-1].
    ``offset``: tokens seen so far = the position of the next token.
    ``engram_calls``: per Engram layer, its fused decode kernel with the weights bound
    (``engramlm.kernels``), built at the first step that runs fused. The model's ``forward``
    updates the cache in place; step outputs equal a full forward over the whole sequence.
    """

    keys: list[Tensor | None]
    values: list[Tensor | None]
    conv_states: dict[int, Tensor] = field(default_factory=dict)
    hash_prefix: Tensor | None = None
    offset: int = 0
    overencoding_prefix: Tensor | None = None
    engram_calls: dict[int, FusedEngram] | None = None  # bound at the first fused step

    @classmethod
    def empty(cls, num_layers: int) -> DecodeCache:
        return cls(keys=[None] * num_layers, values=[None] * num_layers)


# --------------------------------------------------------------------------------------------
# Attention and feed-forward
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q_proj = nn.Linear(D, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, D, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: DecodeCache | None = None,
        layer_id: int = 0,
    ) -> Tensor:
        """x [B, T, D], cos/sin [T, hd/2] at positions offset..offset+T-1 -> [B, T, D]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, h, T, hd], [B, kv, T, hd]
        if cache is not None:
            past_k, past_v = cache.keys[layer_id], cache.values[layer_id]
            if past_k is not None and past_v is not None:
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            cache.keys[layer_id], cache.values[layer_id] = k, v  # [B, kv, offset+T, hd]
        past = k.shape[2] - T
        if past == 0:
            mask, causal = None, True
        else:
            # Query i sits at position past+i and sees keys 0..past+i.
            key_pos = torch.arange(k.shape[2], device=x.device)
            query_pos = past + torch.arange(T, device=x.device)
            mask, causal = key_pos[None, :] <= query_pos[:, None], False  # [T, past+T]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
        )  # [B, h, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, D]


class MLP(nn.Module):
    """SwiGLU feed-forward: W_down (SiLU(W_gate x) * W_up x)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # [*, D] -> [*, D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """DeepSeek-V3 mixture of experts with auxiliary-loss-free load balancing.

    Affinities s_i = sigmoid(u . r_i); the top-k experts are chosen by s_i + b_i, where b is a
    per-expert bias used *only for selection*; the gate weights are the chosen s_i normalised to
    sum to ``moe_routed_scale`` (V3's routed scaling factor, 2.5 there; 1 by default, which
    makes the routed output a weighted mean of k experts). Shared experts see every token and are
    stored as one SwiGLU of width ``num_shared * expert_hidden_size`` (same parameters and
    FLOPs). After each optimiser step :meth:`update_bias` moves b_i by
    ``rate * sign(mean load - load_i)`` (arXiv 2408.15664), so overloaded experts are picked
    less. Loads are counted in ``expert_counts`` across forwards (e.g. gradient accumulation)
    until the update; under data parallelism, all-reduce that buffer before updating.

    Tokens are grouped by expert (one sort), so the Python loop runs over experts, not tokens.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D, F_e, E = config.hidden_size, config.expert_hidden_size, config.num_experts
        self.num_experts, self.top_k = E, config.experts_per_token
        self.bias_update_rate = config.moe_bias_update_rate
        self.routed_scale = config.moe_routed_scale
        self.router = nn.Linear(D, E, bias=False)
        # Routed experts stacked as [E, out, in], nn.Linear's layout.
        self.gate_proj = nn.Parameter(torch.empty(E, F_e, D))
        self.up_proj = nn.Parameter(torch.empty(E, F_e, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_e))
        shared = config.num_shared_experts * F_e
        self.shared = MLP(D, shared) if shared else None
        self.register_buffer("expert_bias", torch.zeros(E))  # b, saved with the model
        self.register_buffer("expert_counts", torch.zeros(E, dtype=torch.int64), persistent=False)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [S, D] -> (expert ids [S, k], gate weights [S, k]); routing in fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(x.float(), self.router.weight.float()))  # [S, E]
            _, experts = torch.topk(scores + self.expert_bias.float(), self.top_k, dim=-1)
            weights = scores.gather(-1, experts)  # [S, k]
            weights = weights / weights.sum(dim=-1, keepdim=True)
            if self.routed_scale != 1.0:
                weights = weights * self.routed_scale
        return experts, weights

    def forward(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, T, D]
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # [S, D]
        experts, weights = self.route(flat)  # [S, k] each
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts)  # [E]
        if self.training:  # evaluation must not steer the balancing
            self.expert_counts += counts
        slots = experts.flatten().argsort(stable=True)  # slot = token * k + j, grouped by expert
        slot_weights = weights.flatten()
        out = torch.zeros_like(flat)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            slot = slots[start : start + n]
            start += n
            token = slot // self.top_k  # [n]
            xe = flat[token]  # [n, D]
            h = F.silu(F.linear(xe, self.gate_proj[e])) * F.linear(xe, self.up_proj[e])
            ye = F.linear(h, self.down_proj[e]) * slot_weights[slot, None].to(h.dtype)  # [n, D]
            out.index_add_(0, token, ye.to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(B, T, D)

    def expert_load(self) -> Tensor:
        """Tokens routed to each expert since the last :meth:`update_bias`, [E] int64."""
        return self.expert_counts.clone()

    @torch.no_grad()
    def update_bias(self, rate: float | None = None) -> Tensor:
        """b_i += rate * sign(mean load - load_i); resets the counts; returns the loads used."""
        rate = self.bias_update_rate if rate is None else rate
        load = self.expert_counts.float()
        self.expert_bias += rate * torch.sign(load.mean() - load)
        counts = self.expert_counts.clone()
        self.expert_counts.zero_()
        return counts


# --------------------------------------------------------------------------------------------
# Residual connections: plain (M = 1) and manifold-constrained hyper-connections (M > 1)
# --------------------------------------------------------------------------------------------

Sublayer = Callable[[Tensor], Tensor]  # [B, T, D] -> [B, T, D]


class Residual(nn.Module):
    """The plain residual h + f(h) on a single stream [B, T, 1, D]; no parameters."""

    def forward(self, streams: Tensor, sublayer: Sublayer) -> Tensor:
        return streams + sublayer(streams[:, :, 0]).unsqueeze(2)  # [B, T, 1, D]


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """[..., M, M] logits -> an (approximately) doubly-stochastic matrix (Sinkhorn-Knopp)."""
    m = (logits - logits.amax(dim=(-2, -1), keepdim=True)).exp()
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)  # rows sum to 1
        m = m / m.sum(dim=-2, keepdim=True)  # columns sum to 1
    return m


class HyperConnections(nn.Module):
    """Manifold-constrained hyper-connections around one sublayer (mHC, arXiv 2512.24880).

    With M streams x [B, T, M, D] and sublayer f:

        x' = H_res x + H_post^T f(H_pre x)

    H_pre [1, M] = sigmoid(.) mixes the streams into the sublayer input (non-negative),
    H_post [1, M] = 2 sigmoid(.) spreads the output over the streams, and H_res [M, M] is
    projected onto doubly-stochastic matrices by Sinkhorn-Knopp, so the residual mixing neither
    grows nor shrinks the signal. Each logit is ``static bias + alpha * dynamic``, where the
    dynamic part is a linear map of the RMS-normalised flattened streams [M*D] (per token).

    Simplifications (documented): the normalisation before the dynamic map has no learnable
    weight; one fused projection serves all three maps; routing math runs in the streams'
    dtype with autocast off. Initialisation: H_pre = 1/M, H_post = 1, H_res near identity,
    dynamic weights zero and alpha = 0.01, so with identical streams (as after the embedding)
    the block computes exactly the plain residual h + f(h) at initialisation.
    """

    def __init__(self, hidden_size: int, hc_mult: int, eps: float, sinkhorn_iters: int = 20):
        super().__init__()
        M = hc_mult
        self.hc_mult, self.eps, self.sinkhorn_iters = M, eps, sinkhorn_iters
        self.dynamic = nn.Parameter(torch.empty(M * M + 2 * M, M * hidden_size))  # phi
        self.bias_pre = nn.Parameter(torch.empty(M))
        self.bias_post = nn.Parameter(torch.empty(M))
        self.bias_res = nn.Parameter(torch.empty(M, M))
        self.alpha = nn.Parameter(torch.empty(3))  # scales of the dynamic pre/post/res terms
        self.reset_parameters()

    def reset_parameters(self) -> None:
        M = self.hc_mult
        nn.init.zeros_(self.dynamic)
        nn.init.constant_(self.bias_pre, math.log(1.0 / (M - 1)))  # sigmoid = 1/M
        nn.init.zeros_(self.bias_post)  # 2 sigmoid(0) = 1
        with torch.no_grad():
            self.bias_res.copy_(4.0 * torch.eye(M))  # Sinkhorn -> diagonal ~0.95 for M = 4
        nn.init.constant_(self.alpha, 0.01)

    def coefficients(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, T, M, D] -> H_pre [B, T, M], H_post [B, T, M], H_res [B, T, M, M]."""
        B, T, M, D = streams.shape
        flat = F.rms_norm(streams.flatten(-2), (M * D,), eps=self.eps)  # [B, T, M*D]
        dyn = F.linear(flat, self.dynamic)  # [B, T, M*M + 2M]
        pre = torch.sigmoid(self.alpha[0] * dyn[..., :M] + self.bias_pre)
        post = 2.0 * torch.sigmoid(self.alpha[1] * dyn[..., M : 2 * M] + self.bias_post)
        res_logits = self.alpha[2] * dyn[..., 2 * M :].view(B, T, M, M) + self.bias_res
        return pre, post, sinkhorn(res_logits, self.sinkhorn_iters)

    def forward(self, streams: Tensor, sublayer: Sublayer) -> Tensor:  # [B, T, M, D]
        with torch.autocast(device_type=streams.device.type, enabled=False):
            pre, post, res = self.coefficients(streams)
            x = torch.einsum("btm,btmd->btd", pre, streams)  # [B, T, D]
        y = sublayer(x).to(streams.dtype)  # [B, T, D]
        with torch.autocast(device_type=streams.device.type, enabled=False):
            mixed = torch.einsum("btij,btjd->btid", res, streams)  # [B, T, M, D]
            return mixed + post.unsqueeze(-1) * y.unsqueeze(2)  # [B, T, M, D]


# --------------------------------------------------------------------------------------------
# Block and model
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    """One decoder layer: [Engram ->] attention -> FFN/MoE, each behind its residual (§2.7)."""

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        engram_moduli: tuple[int, ...] | None = None,
        tables: TablePlan | None = None,
    ) -> None:
        super().__init__()
        D, M = config.hidden_size, config.hc_mult
        self.layer_id = layer_id
        self.engram: Engram | None = None
        if config.engram is not None and engram_moduli is not None:
            table = build_table(
                tables or TablePlan(),
                sum(engram_moduli),
                config.engram.head_dim,
                name=f"engram_layer{layer_id}",
                init=False,  # EngramLM.init_weights initialises it: rows written once
            )
            self.engram = Engram(config.engram, D, engram_moduli, table=table)
        # "w/o multi-branch" (paper §6.2): Engram is one more sublayer under mHC, gating once
        # the streams its pre-mapping fused; its post-mapping spreads Y back over the streams
        # (and its residual mixing H_res acts, as around attention and FFN; our choice: the
        # paper says only "one fusion after the mHC pre-mapping").
        self.engram_residual: HyperConnections | None = None
        if self.engram is not None and not self.engram.config.multi_branch:
            self.engram_residual = HyperConnections(D, M, config.norm_eps)
        self.attn_norm = nn.RMSNorm(D, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = nn.RMSNorm(D, eps=config.norm_eps)
        self.ffn: MLP | MoE = (
            MoE(config) if config.is_moe_layer(layer_id) else MLP(D, config.ffn_hidden_size)
        )
        residual = (lambda: HyperConnections(D, M, config.norm_eps)) if M > 1 else Residual
        self.attn_residual, self.ffn_residual = residual(), residual()

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        hash_ids: Tensor | None = None,
        cache: DecodeCache | None = None,
        engram_call: FusedEngram | None = None,
    ) -> Tensor:
        """h [B, T, M, D], hash_ids [B, T, H] (Engram layers) -> [B, T, M, D]. ``engram_call``:
        this layer's Engram as the fused kernel (decoding on the CPU; ``engramlm.kernels``)."""
        if self.engram is not None:
            if hash_ids is None:
                raise ValueError(f"layer {self.layer_id} has Engram but got no hash_ids")
            conv_state = None if cache is None else cache.conv_states.get(self.layer_id)
            if engram_call is not None:  # h + Y in one call
                h, conv_state = engram_call(h, hash_ids, conv_state, residual=True)
            elif self.engram_residual is None:
                y, conv_state = self.engram(h, hash_ids, conv_state)
                h = h + y  # [B, T, M, D]; before attention and FFN (SPEC §2.7)
            else:
                h, conv_state = self._fused_engram(h, hash_ids, conv_state)
            if cache is not None:
                cache.conv_states[self.layer_id] = conv_state
        h = self.attn_residual(
            h, lambda x: self.attn(self.attn_norm(x), cos, sin, cache, self.layer_id)
        )
        return self.ffn_residual(h, lambda x: self.ffn(self.ffn_norm(x)))

    def _fused_engram(
        self, h: Tensor, hash_ids: Tensor, conv_state: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Engram without multi-branch: h [B, T, M, D] -> (h [B, T, M, D], conv state)."""
        assert self.engram is not None and self.engram_residual is not None  # our invariant
        engram, state = self.engram, [conv_state]

        def sublayer(x: Tensor) -> Tensor:  # the fused stream [B, T, D] -> Y [B, T, D]
            y, state[0] = engram(x.unsqueeze(2), hash_ids, state[0])
            return y.squeeze(2)

        h = self.engram_residual(h, sublayer)
        assert state[0] is not None
        return h, state[0]


class ModelOutput(NamedTuple):
    logits: Tensor  # [B, T, V]
    loss: Tensor | None  # mean token cross-entropy when targets were given
    cache: DecodeCache | None


class EngramLM(nn.Module):
    """Decoder-only LM with Engram memory at ``config.engram.layer_ids`` (SPEC §2).

    ``compressed_vocab`` is the tokenizer compression P: V -> V' (SPEC §2.1); without one the
    lookup is the identity and ``config.compressed_vocab_size`` must be ``None``. Hash ids may
    be precomputed by the data loader with :meth:`compute_hash_ids` (what prefetching needs)
    or are computed inside ``forward``. ``tables`` places the Engram tables (device, host,
    disk; SPEC §5); the model only ever calls ``lookup``, ``prefetch`` and ``warm`` on them.
    """

    def __init__(
        self,
        config: ModelConfig,
        compressed_vocab: CompressedVocab | None = None,
        tables: TablePlan | None = None,
    ):
        super().__init__()
        self.config = config
        V, D = config.vocab_size, config.hidden_size
        raw_ids = config.engram is not None and not config.engram.compress_tokens
        if compressed_vocab is None or raw_ids:
            if compressed_vocab is None and config.compressed_vocab_size is not None:
                raise ValueError(
                    f"config.compressed_vocab_size={config.compressed_vocab_size} needs the "
                    "CompressedVocab it was built from; pass compressed_vocab="
                )
            if compressed_vocab is not None and compressed_vocab.vocab_size != V:
                raise ValueError(
                    f"compressed_vocab maps {compressed_vocab.vocab_size} raw ids but "
                    f"vocab_size={V}"
                )
            # No compression (none given, or engram.compress_tokens=False): the hash reads raw
            # ids; a given vocabulary only names the tokenizer (its fingerprint).
            lookup = torch.arange(V, dtype=torch.int64, device="cpu")
            given = compressed_vocab is not None
            self.vocab_fingerprint = compressed_vocab.fingerprint if given else ""
        else:
            if compressed_vocab.vocab_size != V:
                raise ValueError(
                    f"compressed_vocab maps {compressed_vocab.vocab_size} raw ids but "
                    f"vocab_size={V}"
                )
            if compressed_vocab.num_compressed != config.compressed_vocab_size:
                raise ValueError(
                    f"compressed_vocab has V'={compressed_vocab.num_compressed} ids but "
                    f"compressed_vocab_size={config.compressed_vocab_size}; set it to "
                    f"{compressed_vocab.num_compressed}"
                )
            lookup = torch.as_tensor(compressed_vocab.lookup, dtype=torch.int64, device="cpu")
            lookup = lookup.clone()
            self.vocab_fingerprint = compressed_vocab.fingerprint
        self._lookup_source = lookup  # CPU copy, restored by init_weights (meta-device builds)
        self.register_buffer("compress_lookup", lookup.clone())  # [V] raw -> compressed id

        self.hasher = self._make_hasher()
        moduli = {} if self.hasher is None else self.hasher.moduli

        self.embed = nn.Embedding(V, D)
        self.overencoding: OverEncoding | None = None  # the §3.2 baseline, at the input
        if config.overencoding is not None:
            oe = config.overencoding
            rows = sum(overencoding_moduli(oe))
            # Rows written once, by init_weights, as for Engram's tables.
            table = build_table(
                tables or TablePlan(), rows, oe.head_dim, name="overencoding", init=False
            )
            self.overencoding = OverEncoding(oe, D, V, table=table)
        self.layers = nn.ModuleList(
            Block(config, i, moduli.get(i), tables) for i in range(config.num_layers)
        )
        self.final_norm = nn.RMSNorm(D, eps=config.norm_eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, hd/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def _make_hasher(self) -> NgramHasher | None:
        """The hash constants (SPEC §2.3); pad is the *compressed* pad id (SPEC §2.2)."""
        e = self.config.engram
        if e is None:
            return None
        if e.pad_id is None:
            raise ValueError(
                "engram.pad_id is unset: bind the config to its tokenizer first (training does; "
                "engramlm.tokenization.resolve_pad_id gives the tokenizer's pad, else EOS) or set "
                "pad_id to the raw id of a special token"
            )
        reset = None if e.reset_token is None else int(self._lookup_source[e.reset_token])
        with torch.device("cpu"):  # constants, also when the model is built on "meta"
            return NgramHasher.from_config(
                e,
                pad_id=int(self._lookup_source[e.pad_id]),
                compressed_vocab_size=self.config.hashing_vocab_size,
                reset_id=reset,
            )

    # --- initialisation and parameter groups -------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, 0.02) weights; output projections scaled by 1/sqrt(2 num_layers).

        Engram's table keeps the backend's ``reset_parameters`` (N(0, 0.02^2), see
        ``tables.base``) and its conv starts at zero (the paper's "Engram Conv Zero Init"). Its
        projections are initialised like the backbone's - keys N(0, 0.02), the value
        projection, which writes into the residual stream, as an output projection, biases
        zero - instead of the demo's ``nn.Linear`` default (docs/design.md has the
        measurements). Over-Encoding initialises itself (``OverEncoding.reset_parameters``).
        Everything is reapplied here, so a model built on the meta device and materialised
        with ``to_empty`` is initialised with one call.
        """
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.config.num_layers)
        engram_modules = {id(m) for b in self.layers if b.engram for m in b.engram.modules()}
        oe = self.overencoding
        oe_modules = set() if oe is None else {id(m) for m in oe.modules()}
        if oe is not None:
            oe.reset_parameters()
        for module in self.modules():
            if id(module) in oe_modules:
                continue
            if id(module) in engram_modules:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                continue
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.RMSNorm | HyperConnections):
                module.reset_parameters()
            elif isinstance(module, MoE):
                nn.init.normal_(module.gate_proj, std=std)
                nn.init.normal_(module.up_proj, std=std)
                nn.init.normal_(module.down_proj, std=out_std)
                module.expert_bias.zero_()
                module.expert_counts.zero_()
        for block in self.layers:
            nn.init.normal_(block.attn.o_proj.weight, std=out_std)
            for mlp in (block.ffn, getattr(block.ffn, "shared", None)):
                if isinstance(mlp, MLP):
                    nn.init.normal_(mlp.down_proj.weight, std=out_std)
            if block.engram is not None:
                engram = block.engram
                nn.init.normal_(engram.kv_proj.weight, std=std)  # keys
                nn.init.normal_(engram.kv_proj.weight[engram.value_rows], std=out_std)
                if engram.kv_proj.bias is not None:
                    nn.init.zeros_(engram.kv_proj.bias)
                if engram.short_conv is not None:
                    nn.init.zeros_(engram.short_conv.weight)  # "Engram Conv Zero Init"
        cos, sin = rope_tables(
            self.config.head_dim, self.config.max_seq_len, self.config.rope_theta
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        self.compress_lookup.copy_(self._lookup_source)
        hasher = self._make_hasher()  # non-persistent constants: rebuilt after ``to_empty``
        if hasher is not None:
            self.hasher = hasher.to(self.compress_lookup.device)
            for block in self.layers:
                if block.engram is not None:
                    block.engram.offsets.copy_(head_offsets(hasher.moduli[block.layer_id]))

    def engram_tables(self) -> list[Table]:
        """Every Engram layer's table, in layer order, then Over-Encoding's (if any), which
        trains like them (Adam, LR x5, no weight decay)."""
        tables = [b.engram.table for b in self.layers if b.engram is not None]
        if self.overencoding is not None:
            tables.append(self.overencoding.table)
        return tables

    def close_tables(self) -> None:
        """Flush and release tables that hold files (disk tier), so they record their checksum
        and unlock; idempotent. In-memory tables have nothing to release."""
        for table in self.engram_tables():
            close = getattr(table, "close", None)
            if callable(close):
                close()

    def engram_table_parameters(self) -> Iterator[nn.Parameter]:
        """The Engram tables' parameters (Adam, LR x5, no weight decay; SPEC §3); tables kept
        outside autograd (host, disk) have none."""
        for table in self.engram_tables():
            if isinstance(table, nn.Module):
                yield from table.parameters()

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not an Engram table row (the backbone optimiser's group)."""
        table_ids = {id(p) for p in self.engram_table_parameters()}
        return (p for p in self.parameters() if id(p) not in table_ids)

    # --- load balancing ----------------------------------------------------------------------
    def moe_layers(self) -> dict[int, MoE]:
        return {b.layer_id: b.ffn for b in self.layers if isinstance(b.ffn, MoE)}

    def expert_load(self) -> dict[int, Tensor]:
        """{layer_id: tokens per expert [E]} since the last bias update (for reporting)."""
        return {i: moe.expert_load() for i, moe in self.moe_layers().items()}

    def update_moe_biases(self, rate: float | None = None) -> dict[int, Tensor]:
        """Loss-free balancing step for every MoE layer; call after each optimiser step."""
        return {i: moe.update_bias(rate) for i, moe in self.moe_layers().items()}

    # --- hashing -----------------------------------------------------------------------------
    def compress(self, input_ids: Tensor) -> Tensor:
        """[B, T] raw ids -> [B, T] compressed ids (SPEC §2.1)."""
        return self.compress_lookup.to(input_ids.device)[input_ids]

    def compute_hash_ids(
        self, input_ids: Tensor, prefix: Tensor | None = None
    ) -> dict[int, Tensor]:
        """{layer_id: [B, T, H]} head-local rows for raw ids [B, T]; ``prefix`` [B, N-1] holds the
        compressed ids before them (decoding). Empty dict without Engram."""
        check_ids(input_ids, self.config.vocab_size)
        if self.hasher is None:
            return {}
        return self.hasher.all_layers(self.compress(input_ids), prefix)

    def warm_tables(self, hash_ids: dict[int, Tensor]) -> None:
        """Hint every Engram table that a later batch's rows ({layer_id: [B, T, H]}, from
        :meth:`compute_hash_ids`) will be looked up. For the data loader's thread, which knows
        batches ahead of the step: disk tables start reading those rows then, and the step's
        own :meth:`forward` prefetch finds them in memory (SPEC §5)."""
        for block in self.layers:
            if block.engram is not None:
                block.engram.warm(hash_ids[block.layer_id])

    def new_cache(self) -> DecodeCache:
        return DecodeCache.empty(self.config.num_layers)

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        *,
        hash_ids: dict[int, Tensor] | None = None,
        targets: Tensor | None = None,
        cache: DecodeCache | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] int64 -> logits [B, T, V] (+ loss with ``targets`` [B, T]).

        ``cache`` (from :meth:`new_cache`) makes this a decoding step: the tokens continue the
        cached ones and the cache is updated in place. ``targets`` use ignore_index -100.
        """
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
        check_ids(input_ids, cfg.vocab_size)
        B, T = input_ids.shape
        offset = 0 if cache is None else cache.offset
        if offset + T > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {offset + T} (cache offset {offset} + {T} new tokens) exceeds "
                f"max_seq_len={cfg.max_seq_len}"
            )
        if B == 0 or T == 0:
            logits = self.lm_head.weight.new_zeros(B, T, cfg.vocab_size)
            loss = None if targets is None else logits.new_zeros(())  # no tokens: loss 0
            return ModelOutput(logits, loss, cache)

        # Decoding on the CPU: hashing and the Engram layers as one fused kernel call each.
        decoding = cache is not None and self.hasher is not None and fusable(input_ids)
        ops = kernels.fused_ops() if decoding else None  # (a model without Engram never builds)
        calls: dict[int, FusedEngram] = {}
        if (
            ops is not None
            and cfg.engram is not None
            and B * T * cfg.engram.num_branches <= FUSED_ROWS
        ):
            calls = self._engram_calls(cache)  # type: ignore[arg-type]
        if self.hasher is not None:
            prefix = None if cache is None else cache.hash_prefix
            if ops is not None and hash_ids is None:
                hash_ids, cache.hash_prefix = self.hasher.fused_step(  # type: ignore[union-attr]
                    ops, input_ids, self.compress_lookup, prefix
                )
            else:
                compressed = self.compress(input_ids)  # [B, T]
                if hash_ids is None:
                    hash_ids = self.hasher.all_layers(compressed, prefix)
                self._check_hash_ids(hash_ids, B, T)
                if cache is not None:
                    cache.hash_prefix = self.hasher.next_prefix(prefix, compressed)
        hash_ids = hash_ids or {}
        # SPEC §5: every layer's rows are known now; start gathering them all before layer 0,
        # so layer l's gather overlaps the blocks before it (a no-op for device tables).
        for block in self.layers:
            if block.engram is not None:
                block.engram.prefetch(hash_ids[block.layer_id])

        cos = self.rope_cos[offset : offset + T]  # [T, hd/2]
        sin = self.rope_sin[offset : offset + T]
        h = self.embed(input_ids)  # [B, T, D]
        if self.overencoding is not None:
            oe_prefix = None if cache is None else cache.overencoding_prefix
            h, oe_prefix = self.overencoding(h, input_ids, oe_prefix)  # [B, T, D], n-grams in
            if cache is not None:
                cache.overencoding_prefix = oe_prefix
        h = h.unsqueeze(2).expand(B, T, cfg.hc_mult, cfg.hidden_size).contiguous()  # [B,T,M,D]
        for block in self.layers:
            h = block(h, cos, sin, hash_ids.get(block.layer_id), cache, calls.get(block.layer_id))
        if cache is not None:
            cache.offset = offset + T
        h = self.final_norm(h.mean(dim=2))  # [B, T, D]; streams merged by their mean
        logits = self.lm_head(h)  # [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100
            )
        return ModelOutput(logits, loss, cache)

    def _engram_calls(self, cache: DecodeCache) -> dict[int, FusedEngram]:
        """The fused kernel of each Engram layer that can run it, bound once per generation."""
        if cache.engram_calls is None:
            calls = {}
            if self.embed.weight.dtype == torch.float32:  # the residual stream's dtype
                for block in self.layers:
                    if block.engram is not None and block.engram_residual is None:
                        call = block.engram.fused_call()
                        if call is not None:
                            calls[block.layer_id] = call
            cache.engram_calls = calls
        return cache.engram_calls

    def _check_hash_ids(self, hash_ids: dict[int, Tensor], B: int, T: int) -> None:
        engram = self.config.engram
        assert engram is not None  # our invariant: only called with Engram layers
        if set(hash_ids) != set(engram.layer_ids):
            raise ValueError(
                f"hash_ids has layers {sorted(hash_ids)}, expected engram.layer_ids "
                f"{sorted(engram.layer_ids)}"
            )
        for layer, ids in hash_ids.items():
            if tuple(ids.shape) != (B, T, engram.num_heads):
                raise ValueError(
                    f"hash_ids[{layer}] must be [B, T, H] = [{B}, {T}, {engram.num_heads}], "
                    f"got {list(ids.shape)}"
                )


# --------------------------------------------------------------------------------------------
# Parameter and FLOP accounting (from the config alone)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStats:
    """Parameter and FLOP counts of a :class:`ModelConfig` (SPEC §4, allocation).

    ``non_embedding_params`` is the paper's P_tot (without vocab embedding and LM head);
    ``active_params`` is P_act, the non-embedding parameters one token uses: attention, norms,
    dense FFNs, top-k routed + shared experts, router, hyper-connections and Engram's dense
    parts (projections, norms, conv). Engram table rows count as sparse (a token reads H rows).
    ``flops_per_token`` is the forward pass: 2 x (active matmul weights + LM head) plus the
    attention scores and weighted sum at context ``seq_len``, 4 * num_layers * seq_len * D
    (the PaLM convention: no causal halving). Over-Encoding counts like Engram: its table rows
    sparse, its projection active (both in P_tot).
    """

    total_params: int
    embedding_params: int  # vocab embedding + LM head (counted once when tied)
    non_embedding_params: int  # P_tot
    active_params: int  # P_act
    engram_table_params: int
    engram_dense_params: int
    flops_per_token: int
    seq_len: int
    overencoding_table_params: int = 0
    overencoding_dense_params: int = 0  # the projection W [D, E]

    @property
    def sparse_params(self) -> int:
        """P_sparse = P_tot - P_act (routed experts not chosen + Engram table rows)."""
        return self.non_embedding_params - self.active_params

    def format(self) -> str:
        def n(x: float) -> str:
            for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
                if abs(x) >= scale:
                    return f"{x / scale:.2f}{unit}"
            return f"{x:.0f}"

        rows = [
            ("total params", n(self.total_params)),
            ("embedding + LM head", n(self.embedding_params)),
            ("P_tot (non-embedding)", n(self.non_embedding_params)),
            ("P_act (activated/token)", n(self.active_params)),
            ("P_sparse", n(self.sparse_params)),
            ("Engram table params", n(self.engram_table_params)),
            ("Engram dense params", n(self.engram_dense_params)),
            (f"forward FLOPs/token @ {self.seq_len}", n(self.flops_per_token)),
        ]
        if self.overencoding_table_params:
            rows[-1:-1] = [
                ("Over-Encoding table params", n(self.overencoding_table_params)),
                ("Over-Encoding dense params", n(self.overencoding_dense_params)),
            ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _engram_counts(config: ModelConfig) -> tuple[int, int, int]:
    """(table params, dense params, dense matmul weights) of all Engram layers."""
    e: EngramConfig | None = config.engram
    if e is None:
        return 0, 0, 0
    D, M, E = config.hidden_size, e.num_branches, e.memory_dim
    moduli = head_moduli(
        layer_ids=e.layer_ids,
        table_sizes=e.table_sizes,
        heads_per_ngram=e.heads_per_ngram,
        max_ngram=e.max_ngram,
    )
    table = sum(sum(p) for p in moduli.values()) * e.head_dim
    keys = 0 if e.gate == "none" else M  # W_K^(m), one per gated branch
    proj = (1 + keys) * (E * D + D)  # W_V and the keys, with biases
    norms = 2 * keys * D + (M * D if e.short_conv else 0)  # key, query norms; conv norms
    conv = M * D * e.kernel_size if e.short_conv else 0
    matmul = (1 + keys) * E * D + conv
    fusion = 0  # without multi-branch: the mHC that fuses the hc_mult streams for Engram
    if not e.multi_branch:
        S = config.hc_mult
        fusion = (S * S + 2 * S) * (S * D + 1) + 3
        matmul += (S * S + 2 * S) * S * D
    L = len(e.layer_ids)
    return table, L * (proj + norms + conv + fusion), L * matmul


def model_stats(config: ModelConfig, seq_len: int | None = None) -> ModelStats:
    """Exact parameter counts (equal to ``sum(p.numel())`` of :class:`EngramLM`) and forward
    FLOPs per token, from the config alone; ``seq_len`` defaults to ``max_seq_len``."""
    c = config
    seq_len = c.max_seq_len if seq_len is None else seq_len
    D, M, L, V, hd = c.hidden_size, c.hc_mult, c.num_layers, c.vocab_size, c.head_dim
    attn = D * c.num_heads * hd * 2 + D * c.num_kv_heads * hd * 2  # q, o; k, v
    norms = 2 * D
    hc = 0 if M == 1 else 2 * ((M * M + 2 * M) * (M * D + 1) + 3)  # two sublayers
    hc_matmul = 0 if M == 1 else 2 * (M * M + 2 * M) * M * D
    dense_ffn = 3 * D * c.ffn_hidden_size
    expert = 3 * D * c.expert_hidden_size
    router = c.num_experts * D
    shared = c.num_shared_experts * expert
    n_moe = sum(c.is_moe_layer(i) for i in range(L))
    n_dense = L - n_moe

    total_layers = L * (attn + norms + hc) + n_dense * dense_ffn
    total_layers += n_moe * (router + shared + c.num_experts * expert)
    active_layers = L * (attn + norms + hc) + n_dense * dense_ffn
    active_layers += n_moe * (router + shared + c.experts_per_token * expert)
    matmul_layers = L * (attn + hc_matmul) + n_dense * dense_ffn
    matmul_layers += n_moe * (router + shared + c.experts_per_token * expert)

    table, engram_dense, engram_matmul = _engram_counts(c)
    oe_table = oe_dense = 0
    if c.overencoding is not None:
        oe_table = sum(overencoding_moduli(c.overencoding)) * c.overencoding.head_dim
        oe_dense = c.overencoding.memory_dim * D  # W [D, E], no bias
    embedding = V * D * (1 if c.tie_embeddings else 2)
    non_embedding = total_layers + D + table + engram_dense + oe_table + oe_dense  # + final norm
    active = active_layers + D + engram_dense + oe_dense
    flops = 2 * (matmul_layers + engram_matmul + oe_dense + V * D) + 4 * L * seq_len * D
    return ModelStats(
        total_params=non_embedding + embedding,
        embedding_params=embedding,
        non_embedding_params=non_embedding,
        active_params=active,
        engram_table_params=table,
        engram_dense_params=engram_dense,
        flops_per_token=flops,
        seq_len=seq_len,
        overencoding_table_params=oe_table,
        overencoding_dense_params=oe_dense,
    )


def allocate(config: ModelConfig, rho: float, engram: EngramConfig | None = None) -> ModelConfig:
    """The allocation ratio of §3.1 (SPEC §4): keep a share ``rho`` of P_sparse in routed experts.

    ``config`` is the pure-MoE reference (rho = 1, no Engram). A share (1 - rho) of its sparse
    parameters, (num_experts - top_k) idle experts per MoE layer, moves into Engram: the routed
    expert count drops by round((1 - rho)(num_experts - top_k)), and the freed parameters,
    minus Engram's dense parts, become table rows split equally across Engram layers, orders and
    heads (each head then rounds up to a distinct prime, so the achieved total is a few rows
    above the base; read it from :func:`model_stats`). ``engram`` gives the shape (layers,
    heads, widths); by default the demo's at layer 1 (0-based) with ``hc_mult`` copied.

    Iso-activation: top-k, expert width and the backbone are unchanged, as in the paper (only
    expert count and table slots change), so P_act changes by Engram's dense parameters
    (projections, norms, conv; ``ModelStats.engram_dense_params``) minus the router rows of the
    removed experts, rather than being compensated elsewhere; at paper scale (d_mem 1280,
    D 2560, two Engram layers) that is ~33M on 3.8B (<1%), in tiny models it can be ~15%.
    Returns ``config`` unchanged when no whole expert moves (e.g. rho = 1).
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if config.num_experts == 0:
        raise ValueError("allocate needs an MoE config (num_experts >= 1), got num_experts=0")
    if config.engram is not None:
        raise ValueError(
            "allocate expects the pure-MoE reference (engram=None); pass the Engram shape as "
            "allocate(config, rho, engram=...)"
        )
    removed = round((1.0 - rho) * (config.num_experts - config.experts_per_token))
    if removed == 0:
        return config
    if engram is None:
        engram = EngramConfig(layer_ids=(min(1, config.num_layers - 1),), hc_mult=config.hc_mult)
    engram = dataclasses.replace(engram, hc_mult=config.hc_mult)
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    freed = removed * n_moe * 3 * config.hidden_size * config.expert_hidden_size
    freed += removed * n_moe * config.hidden_size  # router rows
    probe = dataclasses.replace(config, engram=engram)
    _, engram_dense, _ = _engram_counts(probe)
    rows = (freed - engram_dense) // engram.head_dim
    per_head = rows // (len(engram.layer_ids) * engram.num_heads)
    if per_head < 2:
        raise ValueError(
            f"rho={rho} frees {freed} parameters, too few for Engram's dense parts "
            f"({engram_dense}) plus a table; use a smaller rho or a smaller Engram"
        )
    # Heads take distinct primes at or above table_size (consecutive across heads, orders and
    # layers), so the rows overshoot table_size * heads; lower table_size until they fit.
    target = rows
    table_size = per_head
    for _ in range(8):
        engram = dataclasses.replace(engram, table_sizes=(table_size,) * engram.num_orders)
        achieved = _engram_counts(dataclasses.replace(config, engram=engram))[0] // engram.head_dim
        excess = achieved - target
        if excess <= 0:
            break
        table_size = max(2, table_size - -(-excess // (len(engram.layer_ids) * engram.num_heads)))
    return dataclasses.replace(config, num_experts=config.num_experts - removed, engram=engram)
