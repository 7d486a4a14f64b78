"""Engram: lookup -> context-aware gate -> short conv -> residual (SPEC §2.4-2.8, paper §2).

Shapes: B batch, T time, M residual branches (hc_mult), D model width, N max n-gram order,
K heads per order, H = (N-1)K hash heads, E = d_mem = (N-1) * embed_dim_per_ngram.

Per position t of layer l (the paper's §2.3 and the demo):

    e_t      = concat_{n, j} E_{n,j}[z_{t,n,j}]                                   [E]
    k_t^(m)  = W_K^(m) e_t,   v_t = W_V e_t                                       [D]
    a_t^(m)  = sigmoid( ssqrt( RMSNorm(h_t^(m)) . RMSNorm(k_t^(m)) / sqrt(D) ) )  scalar
    u_t^(m)  = a_t^(m) v_t
    Y        = SiLU( Conv1D( RMSNorm^(m)(U) ) ) + U        (depthwise, causal, dilation N)
    H^(m)   <- H^(m) + Y^(m)                               (before attention and FFN)

``ssqrt(s) = sign(s) sqrt(max(|s|, 1e-6))`` is the demo's; the paper omits it (``gate="plain"``).

Ablations (paper §6.2, ``EngramConfig`` switches): ``gate="none"`` sets a = 1 and builds no key
projections; ``short_conv=False`` gives Y = U; ``multi_branch=False`` makes M = 1 here: the block
hands Engram the single stream an mHC pre-mapping fused (``model.Block``), and
``compress_tokens=False`` only changes the ids the model hashes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engramlm import kernels
from engramlm.config import EngramConfig
from engramlm.tables import DeviceTable, Table

# From this many positions (B x T) on, the short conv runs inference as one conv2d call rather
# than a sum over its taps; below, the call's fixed cost is more (at B=1: 28 against 15 us for
# one position, 30 against 40 for 16; benchmarks in ShortConv._conv_call).
_CONV_CALL_POSITIONS = 16

# Up to this many rows of D channels (B x T x M) an inference forward on the CPU in float32 runs
# as one call of the fused kernel (engramlm.kernels): decode steps and short prompts. Past it
# PyTorch's operators win (their conv is one vectorised call; the kernel's prompt path runs
# channel by channel). One thread, D=256 (docs/benchmarks.md): M=1, B=8, T=32: 774 against
# 1153 us, T=128: 3498 against 4183, T=512: 22.7 against 18.1 ms; M=4, B=8, T=8: 676 against
# 1002 us, T=32: 2994 against 2629.
FUSED_ROWS = 256


class GroupRMSNorm(nn.Module):
    """RMSNorm of each of M groups of D channels, each group with its own weight: [..., M, D].

    One call for all residual branches (the per-branch norms of SPEC §2.8), the way Qwen4-Exp's
    group-wise norms and DeepSeek-V4.1's per-stream normalisation do it. ``eps=None`` is
    torch's default (``finfo(dtype).eps``), as ``nn.RMSNorm`` in the demo.
    """

    def __init__(self, groups: int, dim: int, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(groups, dim))

    def forward(self, x: Tensor) -> Tensor:  # [..., M, D] -> [..., M, D]
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"groups={self.weight.shape[0]}, dim={self.weight.shape[1]}, eps={self.eps}"


class ShortConv(nn.Module):
    """Y = SiLU(Conv1D(RMSNorm(U))) over all M*D channels, depthwise and causal (SPEC §2.6).

    Kernel ``w``, dilation ``delta`` (= N), no bias, zero-initialised (paper's "Engram Conv Zero
    Init"), so at initialisation the Engram output is exactly the gated value. The caller adds
    the residual ``U``. The per-branch RMSNorm has the demo's eps, 1e-5 (``norm_eps``): with
    the small table init the conv input's mean square is ~1e-6, where torch's default eps
    (1.2e-7 in fp32) would give a different scale. For decoding, ``state`` carries the last
    ``(w-1)*delta`` normalised inputs, so a step costs O(1) in context length and equals the
    full-sequence result.
    """

    def __init__(
        self, dim: int, hc_mult: int, kernel_size: int, dilation: int, norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.dim, self.hc_mult = dim, hc_mult
        self.kernel_size, self.dilation = kernel_size, dilation
        self.norm = GroupRMSNorm(hc_mult, dim, norm_eps)
        channels = hc_mult * dim
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size))  # depthwise filters

    @property
    def receptive_field(self) -> int:
        """Past positions the conv reads: (w - 1) * delta."""
        return (self.kernel_size - 1) * self.dilation

    def forward(self, u: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """[B, T, M, D] (+ state [B, M*D, P]) -> ([B, T, M, D], new state [B, M*D, P])."""
        B, T, M, D = u.shape
        P = self.receptive_field
        x = self.norm(u).flatten(-2)  # [B, T, M*D]
        if state is None:
            x = F.pad(x, (0, 0, P, 0))  # causal left padding, [B, P+T, M*D]
        else:
            x = torch.cat([state.transpose(1, 2), x], dim=1)  # [B, P+T, M*D]
        if B * T >= _CONV_CALL_POSITIONS and not torch.is_grad_enabled():
            y = self._conv_call(x)
        else:
            # Few positions (decoding): a sum over the w taps, y[t] = sum_i W[:, i] x[t + i*delta],
            # a few fused elementwise ops instead of a oneDNN call's fixed cost.
            w = self.weight.to(x.dtype).squeeze(1).t()  # [w, M*D]
            y = x[:, :T] * w[0]
            for i in range(1, self.kernel_size):
                y = torch.addcmul(y, x[:, i * self.dilation : i * self.dilation + T], w[i])
        new_state = x[:, x.shape[1] - P :].transpose(1, 2).contiguous()  # [B, M*D, P]
        return F.silu(y.reshape(B, T, M * D)).view(B, T, M, D), new_state

    def _conv_call(self, x: Tensor) -> Tensor:
        """[B, P+T, C] -> [B, T, C]: the depthwise dilated conv as one ``conv2d`` call on the
        [B, C, 1, P+T] view of ``x``, which is channels-last, so no transposing copy either
        way. At B=8, T=512, C=1024 on one CPU thread: 3.6 ms against 8.7 ms for the four taps
        (bitwise equal here). Inference only: forward + backward gained little (75.7 against
        79.0 ms), the weight's gradient comes back in strides DDP's buckets do not expect, and
        sharded training under FSDP no longer matched one process to 1e-6; training keeps the
        taps. fp32 even under autocast, like the taps (elementwise ops autocast leaves alone)."""
        C = x.shape[-1]
        w = self.weight.to(x.dtype).unsqueeze(2)  # [C, 1, 1, w]
        view = x.transpose(1, 2).unsqueeze(2)  # [B, C, 1, P+T], channels-last strides
        with _autocast_off(x.device.type):
            y = F.conv2d(view, w, groups=C, dilation=(1, self.dilation))
        return y.squeeze(2).transpose(1, 2)  # [B, T, C]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        _stack_legacy(state_dict, prefix, "norms.{}.weight", "norm.weight", self.hc_mult)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _stack_legacy(state: dict, prefix: str, old: str, new: str, count: int) -> None:
    """Checkpoints written before the per-branch modules were fused kept one tensor per branch
    (``old`` with the branch index); stack them into the fused ``new`` parameter in place."""
    keys = [prefix + old.format(m) for m in range(count)]
    if keys and all(k in state for k in keys):
        state[prefix + new] = torch.stack([state.pop(k) for k in keys])


def fusable(x: Tensor) -> bool:
    """Whether the fused kernels (``engramlm.kernels``) may run a forward on ``x``: float32
    on the CPU, no autograd, no autocast, not under ``torch.compile`` (which fuses the
    PyTorch operators itself)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.int64)
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


_GATE_MODES = {"none": 0, "plain": 1, "signed_sqrt": 2}


def context_gate(query: Tensor, key: Tensor, signed_sqrt: bool = True) -> Tensor:
    """alpha = sigmoid(RMSNorm(h) . RMSNorm(k) / sqrt(D)); paper §2.3, SPEC §2.5.

    ``query`` and ``key`` are already RMS-normalised, [B, T, D] each -> [B, T, 1]. Follows the
    demo's signed square root of the scaled dot product before the sigmoid (it keeps the gate
    out of saturation); ``signed_sqrt=False`` gives the paper's plain form.
    """
    s = (query * key).sum(dim=-1, keepdim=True) / math.sqrt(query.shape[-1])
    return gate_activation(s, signed_sqrt)


def gate_activation(s: Tensor, signed_sqrt: bool = True) -> Tensor:
    """sigmoid(ssqrt(s)), or sigmoid(s) without ``signed_sqrt``, of the scaled score s."""
    if signed_sqrt:
        s = s.sign() * s.abs().clamp_min(1e-6).sqrt()
    return torch.sigmoid(s)


def inverse_rms(x: Tensor, eps: float | None) -> Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, [..., D] -> [..., 1], the scale RMSNorm
    applies (``eps=None``: torch's default, the eps of fp32 for bf16 and fp16), in fp32. One fused
    reduction (``vector_norm``) instead of the norm's full-width passes."""
    if eps is None:  # what F.rms_norm takes: the eps of the type it accumulates in
        eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.rsqrt(norm.square() / x.shape[-1] + eps)  # fp32, as RMSNorm accumulates


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast(enabled=False)`` where autocast is on, else a no-op context: entering a
    disabled autocast costs ~4 us, a tenth of a decoding step's gate."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def head_offsets(moduli: Sequence[int]) -> Tensor:
    """[H] int64: the first row of each head in one physical table, heads stacked in order
    (head h holds ``moduli[h]`` rows; SPEC §2.4)."""
    return torch.tensor([0, *moduli[:-1]], dtype=torch.int64).cumsum(0)


def table_rows(moduli: Sequence[int], multiple: int = 1) -> int:
    """Rows of the physical table of heads with ``moduli`` rows each: their sum, padded up to
    a multiple of ``multiple`` (rows past the sum are never addressed)."""
    return -(-int(sum(moduli)) // multiple) * multiple


def head_table(
    moduli: Sequence[int], head_dim: int, table: Table | None, owner: str, multiple: int = 1
) -> Table:
    """The physical table of heads with ``moduli`` rows each: ``table`` checked, or a new
    in-memory :class:`DeviceTable` of [table_rows(moduli, multiple), head_dim]."""
    num_rows = table_rows(moduli, multiple)
    table = table if table is not None else DeviceTable(num_rows, head_dim)
    if (table.num_rows, table.dim) != (num_rows, head_dim):
        raise ValueError(
            f"table is [{table.num_rows}, {table.dim}] but {owner} need [{num_rows}, {head_dim}] "
            f"(sum of head primes padded to a multiple of {multiple}, embed_dim_per_ngram/K)"
        )
    return table


class Engram(nn.Module):
    """One Engram layer: multi-head table lookup, per-branch gates, shared value, short conv.

    ``table`` is any :class:`~engramlm.tables.Table` backend holding all H heads contiguously
    (head h starts at row ``offsets[h]``); by default an in-memory :class:`DeviceTable`.
    ``forward`` takes the hidden state and this layer's precomputed head-local hash ids and
    returns ``Y``, which the caller adds to the residual stream(s).

    The M keys W_K^(m) and the shared value W_V are one projection ``kv_proj`` of
    (M+1)*D outputs, keys first (DeepSeek-V4.1's ``wkv`` layout; one GEMM instead of M+1), and
    the per-branch key and query RMSNorms are one :class:`GroupRMSNorm` each. Mathematically
    these are the paper's per-branch maps; checkpoints of the per-branch layout still load.
    """

    def __init__(
        self,
        config: EngramConfig,
        hidden_size: int,
        moduli: Sequence[int],
        table: Table | None = None,
    ) -> None:
        super().__init__()
        if len(moduli) != config.num_heads:
            raise ValueError(
                f"moduli needs one prime per head ({config.num_heads} = (max_ngram-1) x "
                f"heads_per_ngram), got {len(moduli)}"
            )
        self.config = config
        self.hidden_size = hidden_size
        M, D, E = config.num_branches, hidden_size, config.memory_dim
        self.table = head_table(
            moduli, config.head_dim, table, "this layer's heads", config.table_rows_multiple
        )
        self.register_buffer("offsets", head_offsets(moduli), persistent=False)
        self.num_keys = M if config.gate != "none" else 0  # "w/o gating": no keys, alpha = 1
        # Biases as in the demo's nn.Linear (config.bias); the paper writes W_K e_t without one.
        self.kv_proj = nn.Linear(E, (self.num_keys + 1) * D, bias=config.bias)  # [W_K^(m); W_V]
        self.key_norm = GroupRMSNorm(M, D, config.norm_eps) if self.num_keys else None
        self.query_norm = GroupRMSNorm(M, D, config.norm_eps) if self.num_keys else None
        self.short_conv = (
            ShortConv(D, M, config.kernel_size, config.max_ngram, config.conv_norm_eps)
            if config.short_conv
            else None
        )

    @property
    def value_rows(self) -> slice:
        """The rows of ``kv_proj`` that are W_V (after the M keys' rows)."""
        start = self.num_keys * self.hidden_size
        return slice(start, start + self.hidden_size)

    def value(self, e: Tensor) -> Tensor:
        """v_t = W_V e_t (+ bias): [B, T, E] -> [B, T, D]."""
        bias = self.kv_proj.bias
        return F.linear(
            e, self.kv_proj.weight[self.value_rows], None if bias is None else bias[self.value_rows]
        )

    def global_rows(self, hash_ids: Tensor) -> Tensor:
        """[B, T, H] head-local ids -> [B, T, H] rows of the physical table."""
        return hash_ids + self.offsets

    def prefetch(self, hash_ids: Tensor) -> None:
        """Hint the table that [B, T, H] head-local ids will be retrieved soon (SPEC §5)."""
        if isinstance(self.table, DeviceTable):
            return  # resident rows: skip even computing the addresses (a decode step's op)
        self.table.prefetch(self.global_rows(hash_ids))

    def warm(self, hash_ids: Tensor) -> None:
        """Hint the table, a batch or more ahead, that [B, T, H] head-local ids will be retrieved
        (disk tables start reading them; see ``EngramLM.warm_tables``)."""
        self.table.warm(self.global_rows(hash_ids))

    def retrieve(self, hash_ids: Tensor) -> Tensor:
        """e_t: [B, T, H] head-local ids -> [B, T, E], orders then heads concatenated."""
        vectors = self.table.lookup(self.global_rows(hash_ids))  # [B, T, H, E/H]
        return vectors.flatten(-2)  # [B, T, E]

    def gates(self, hidden: Tensor, hash_ids: Tensor) -> Tensor:
        """alpha_t^(m), the gate of every branch: ([B, T, M, D], [B, T, H]) -> [B, T, M].

        Exactly the values :meth:`forward` multiplies with (ones for ``gate="none"``); for
        analyses such as ``engramlm experiment gates``.
        """
        if self.num_keys == 0:
            return hidden.new_ones(hidden.shape[:3])
        kv = self.kv_proj(self.retrieve(hash_ids).to(hidden.dtype))
        return self._gates(hidden, kv).squeeze(-1)

    def _gates(self, hidden: Tensor, kv: Tensor) -> Tensor:
        """([B, T, M, D], kv [B, T, (M+1)D]) -> [B, T, M, 1], per-branch gates (SPEC §2.5, §2.8).

        The two RMSNorms are folded into the dot product: RMSNorm(h) w_q . RMSNorm(k) w_k =
        (h . (w_q w_k k)) / (rms(h) rms(k)), the same value as ``context_gate`` on the
        normalised tensors without writing them out (two scalars per branch instead of two
        full-width tensors; ``test_engram_matches_reference`` holds it to the spec's form).
        With ``gate_fp32`` the norms, dot product and sigmoid run in fp32 and the gate stays fp32
        (DeepSeek-V4.1 multiplies it with the value in fp32)."""
        assert self.key_norm is not None and self.query_norm is not None
        keys = kv[..., : self.value_rows.start].unflatten(-1, (self.num_keys, self.hidden_size))
        if self.config.gate_fp32:
            hidden, keys = hidden.float(), keys.float()
        # The norms' dtypes promote as the product of the normalised tensors would: under
        # autocast vecdot would round an fp32 residual stream to bf16, which mul and sum don't.
        dtype = torch.promote_types(hidden.dtype, keys.dtype)
        weight = self.query_norm.weight * self.key_norm.weight  # [M, D]
        query, key = hidden.to(dtype), (keys * weight.to(keys.dtype)).to(dtype)
        with _autocast_off(hidden.device.type):
            dot = torch.linalg.vecdot(query, key)
        dot = dot.unsqueeze(-1).float()  # [B, T, M, 1]
        # Two inverse RMS, as the norms compute them. One rsqrt of their product (two scalar
        # ops fewer, ~4 us at T=1) rounds differently: training would no longer reproduce runs
        # stored before it bit for bit, and the FSDP test's last-bit differences from one
        # process grew, through Adam, to 1.5e-5 in two table rows (tests/test_distributed.py).
        scale = inverse_rms(hidden, self.query_norm.eps) * inverse_rms(keys, self.key_norm.eps)
        s = dot * scale / math.sqrt(self.hidden_size)
        alpha = gate_activation(s, signed_sqrt=self.config.gate == "signed_sqrt")
        return alpha if self.config.gate_fp32 else alpha.to(kv.dtype)

    def gated_value(self, hidden: Tensor, hash_ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """U = alpha^(m) v per branch: ([B, T, M, D], [B, T, H]) -> [B, T, M, D], before the conv.

        In the model dtype, or in fp32 with ``gate_fp32``: DeepSeek-V4.1 adds gate * value to
        the streams in fp32 and rounds once (its spec §5 step 5), which ``deepseek_v41`` does
        with this. ``mask`` as in :meth:`forward` (it zeroes the gate of masked positions).
        """
        self._check_hidden(hidden)
        B, T, M, D = hidden.shape
        e = self.retrieve(hash_ids).to(hidden.dtype)  # [B, T, E]
        kv = self.kv_proj(e)  # [B, T, (M+1)D]: M keys, then the shared value
        v = kv[..., self.value_rows].unsqueeze(2)  # [B, T, 1, D]
        alpha = v.new_ones(B, T, M, 1) if self.num_keys == 0 else self._gates(hidden, kv)
        if mask is not None:
            alpha = alpha * mask[:, :, None, None].to(alpha.dtype)  # [B, T, M, 1]
        return alpha * v  # [B, T, M, D]

    def forward(
        self,
        hidden: Tensor,
        hash_ids: Tensor,
        conv_state: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """([B, T, M, D], [B, T, H]) -> (Y [B, T, M, D], conv state for decoding).

        M is ``config.num_branches``: ``hc_mult``, or 1 without multi-branch. Without the short
        conv the state is empty, [B, M*D, 0]. ``mask`` ([B, T] bool, optional) zeroes the
        gated value of positions that are not tokens (padding, DeepSeek-V4.1's DEAD), so they
        add nothing to the residual and feed zeros to the conv.

        Up to ``FUSED_ROWS`` rows (B x T x M), in float32 on the CPU without autograd (decode
        steps, short prompts), this runs as one call of the fused C++ kernel (:meth:`fused_call`,
        ``engramlm.kernels``): the same values to float rounding.
        """
        B, T, M, D = hidden.shape
        if B * T * M <= FUSED_ROWS and fusable(hidden):
            call = self.fused_call()
            if call is not None:
                self._check_hidden(hidden)
                return call(hidden, hash_ids, conv_state, mask)
        u = self.gated_value(hidden, hash_ids, mask).to(hidden.dtype)  # [B, T, M, D]
        if self.short_conv is None:
            return u, u.new_zeros(B, M * D, 0)
        y, conv_state = self.short_conv(u, conv_state)
        return u + y, conv_state

    def fused_call(self) -> kernels.FusedEngram | None:
        """This layer's forward as one call of the fused C++ kernel (``engramlm.kernels``), with
        its weights bound: the same result as :meth:`forward` to float rounding, for float32
        on the CPU without autograd. ``None`` where the kernel cannot run it (kernels not
        built, weights not float32 on the CPU)."""
        weight = self.kv_proj.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None
        ops = kernels.fused_ops()
        if ops is None:
            return None
        table, lookup = self.table, None
        if isinstance(table, DeviceTable) and table.dtype == torch.float32:
            rows = table.weight  # the kernel gathers the rows itself
        else:  # host, disk or fp8 tables: their own lookup, then the kernel
            rows, lookup = None, self.retrieve
        eps = torch.finfo(torch.float32).eps  # eps=None: torch's default, as F.rms_norm's
        conv, q, k = self.short_conv, self.query_norm, self.key_norm
        consts = (
            rows,
            self.offsets,
            weight,
            self.kv_proj.bias,
            None if q is None else q.weight,
            None if k is None else k.weight,
            eps if q is None or q.eps is None else q.eps,
            eps if k is None or k.eps is None else k.eps,
            _GATE_MODES[self.config.gate],
            None if conv is None else conv.weight,
            None if conv is None else conv.norm.weight,
            1e-5 if conv is None else conv.norm.eps,
            1 if conv is None else conv.dilation,
        )
        return kernels.FusedEngram(ops.engram_step, lookup, consts)

    def _check_hidden(self, hidden: Tensor) -> None:
        if hidden.dim() != 4 or hidden.shape[2:] != (self.config.num_branches, self.hidden_size):
            raise ValueError(
                f"hidden must be [B, T, M={self.config.num_branches}, D={self.hidden_size}] "
                f"(M = hc_mult={self.config.hc_mult}, or 1 with multi_branch=False), "
                f"got {list(hidden.shape)}"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Per-branch layout of earlier checkpoints: key_projs.m / value_proj, key_norms.m,
        # query_norms.m. Stacked into kv_proj (keys first, then value) and the group norms.
        M = self.num_keys
        for part in ("weight", "bias"):
            value = f"{prefix}value_proj.{part}"
            keys = [f"{prefix}key_projs.{m}.{part}" for m in range(M)]
            if value in state_dict and all(k in state_dict for k in keys):
                parts = [state_dict.pop(k) for k in keys] + [state_dict.pop(value)]
                state_dict[f"{prefix}kv_proj.{part}"] = torch.cat(parts)
        _stack_legacy(state_dict, prefix, "key_norms.{}.weight", "key_norm.weight", M)
        _stack_legacy(state_dict, prefix, "query_norms.{}.weight", "query_norm.weight", M)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
