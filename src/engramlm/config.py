"""Configuration dataclasses: frozen, validated at construction, round-trip through dicts.

Every error names the field, the offending value and what would be valid. Variants are made
with ``dataclasses.replace(cfg, ...)``; derived values are properties, never stored fields.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal

GateForm = Literal["signed_sqrt", "plain", "none"]
MultiplierScheme = Literal["numpy", "splitmix64"]
HashLayerKey = Literal["layer_id", "layer_index"]
# EngramConfig's boolean ablation switches, all True in the full model.
_ABLATION_SWITCHES = ("multi_branch", "compress_tokens", "short_conv")
# Fields added after configs were first saved: left out of ``to_dict`` at their defaults, so
# older configs (and the run digests and resume checks built on them) read and compare unchanged.
_NEWER_FIELDS = (
    *_ABLATION_SWITCHES,
    "bias",
    "norm_eps",
    "conv_norm_eps",
    "gate_fp32",
    "multiplier_scheme",
    "hash_layer_key",
    "reset_token",
    "table_rows_multiple",
)


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_float(name: str, value: object, lo: float, *, inclusive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if value < lo or (not inclusive and value == lo):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {lo}, got {value}")


def check_fields(cls: type, d: dict[str, Any]) -> None:
    """Refuse keys that are not fields of the dataclass ``cls``, listing the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        first = sorted(unknown)[0]
        near = difflib.get_close_matches(first, sorted(known), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ValueError(
            f"unknown {cls.__name__} fields {sorted(unknown)}; {hint}known: {sorted(known)}"
        )


@dataclass(frozen=True)
class EngramConfig:
    """Hyper-parameters of the Engram memory (SPEC §2, §3).

    Defaults are the official demo's (``engram_demo_v1.py``): tables of 129280*5 rows per head
    and order, N=3, K=8 heads, 512 dims per order, layers (1, 15) 0-based, seed 0, kernel 4,
    4 residual branches. Where the paper and the demo differ we follow the demo and say so: the
    gate's signed square root (``gate="signed_sqrt"``; ``"plain"`` is the paper's formula), bias
    terms on the key/value projections (the demo's ``nn.Linear`` default), torch's default eps
    in the gate's RMSNorms and 1e-5 in the short conv's. Layer ids are 0-based: the paper's
    "layer 2" is ``layer_ids=(1,)``.

    ``pad_id`` is the raw id that fills the n-gram history before a sequence start. It must be
    a special token that no ordinary token shares after compression; ``None`` (the default)
    takes the tokenizer's pad token, else its EOS, when the config is bound to a tokenizer
    (``engramlm.tokenization.resolve_pad_id``; train, eval, retrofit and the loaders do it).
    The demo's 2 is DeepSeek-V3's pad id: in another tokenizer id 2 is an ordinary token
    (``"!"`` in ours), which would alias every sequence start with real n-grams.

    Ablation switches (paper §6.2; ``engramlm experiment ablations``), each removing one
    component, the defaults keeping the full model: ``gate="none"`` fixes alpha = 1 (no key
    projections or norms); ``multi_branch=False`` gates once, on the streams fused by an mHC
    pre-mapping, instead of once per branch (needs ``hc_mult > 1``); ``compress_tokens=False``
    hashes raw token ids instead of the compressed ones (SPEC §2.1); ``short_conv=False``
    drops the short convolution, so Y = alpha * v.

    Variant fields, each defaulting to the demo (see :meth:`preset` for the released models'
    values and docs/design.md for the sources): ``bias`` on the fused key/value projection;
    ``norm_eps`` of the gate's RMSNorms (``None`` = torch's default) and ``conv_norm_eps`` of
    the conv's; ``gate_fp32`` computes the gate in fp32 whatever the model dtype (DeepSeek-V4.1);
    ``multiplier_scheme`` draws a layer's odd multipliers with numpy's ``default_rng`` (demo,
    DeepSeek-V4.1) or SplitMix64 (Qwen4-Exp), seeded ``seed + 10007 * key`` where the key is
    the layer's id or, with ``hash_layer_key="layer_index"``, its index in ``layer_ids``
    (Qwen4-Exp); ``reset_token`` (a raw id, e.g. EOS) restarts the n-gram history after every
    occurrence (Qwen4-Exp, whose filler is then that token); ``table_rows_multiple`` pads each
    layer's physical table to a multiple of that many rows (never addressed; Qwen4-Exp: 128).
    Fields left at their defaults are left out of :meth:`to_dict`, so configs saved before they
    existed read and compare unchanged.
    """

    table_sizes: tuple[int, ...] = (129280 * 5, 129280 * 5)  # per order 2..N, before primes
    max_ngram: int = 3  # N; orders 2..N are hashed
    heads_per_ngram: int = 8  # K
    embed_dim_per_ngram: int = 512  # width of one order's concatenated heads
    layer_ids: tuple[int, ...] = (1, 15)  # 0-based
    pad_id: int | None = None  # raw filler id; None: the tokenizer's pad, else EOS
    seed: int = 0  # seeds the hash multipliers (SPEC §2.3)
    kernel_size: int = 4  # short conv kernel w; dilation is max_ngram
    hc_mult: int = 4  # M residual branches (1 = plain residual)
    gate: GateForm = "signed_sqrt"  # or "plain" (the paper's formula) or "none" (alpha = 1)
    multi_branch: bool = True  # one gate per residual branch (SPEC §2.8)
    compress_tokens: bool = True  # hash compressed ids (SPEC §2.1); False: raw ids
    short_conv: bool = True  # Y = SiLU(Conv1D(RMSNorm(U))) + U; False: Y = U
    bias: bool = True  # biases on the key/value projection (demo's nn.Linear)
    norm_eps: float | None = None  # gate RMSNorms' eps; None: torch's default (demo)
    conv_norm_eps: float = 1e-5  # short conv RMSNorm's eps (demo)
    gate_fp32: bool = False  # gate computed in fp32 (DeepSeek-V4.1)
    multiplier_scheme: MultiplierScheme = "numpy"  # numpy default_rng (demo) or splitmix64
    hash_layer_key: HashLayerKey = "layer_id"  # seeds multipliers: layer id or its index
    reset_token: int | None = None  # raw id after which the n-gram history restarts
    table_rows_multiple: int = 1  # physical rows of a layer's table padded to a multiple

    def __post_init__(self) -> None:
        # Lists from JSON/TOML become tuples so the config stays hashable and immutable.
        object.__setattr__(self, "table_sizes", tuple(self.table_sizes))
        object.__setattr__(self, "layer_ids", tuple(self.layer_ids))
        _check_int("max_ngram", self.max_ngram, 2)
        if len(self.table_sizes) != self.max_ngram - 1:
            raise ValueError(
                f"table_sizes needs one entry per n-gram order 2..{self.max_ngram} "
                f"({self.max_ngram - 1} entries), got {len(self.table_sizes)}: {self.table_sizes}"
            )
        for n, size in enumerate(self.table_sizes, start=2):
            _check_int(f"table_sizes[{n - 2}] (order {n})", size, 2)
        _check_int("heads_per_ngram", self.heads_per_ngram, 1)
        _check_int("embed_dim_per_ngram", self.embed_dim_per_ngram, 1)
        if self.embed_dim_per_ngram % self.heads_per_ngram:
            raise ValueError(
                f"embed_dim_per_ngram={self.embed_dim_per_ngram} must be divisible by "
                f"heads_per_ngram={self.heads_per_ngram} (each head stores "
                "embed_dim_per_ngram / heads_per_ngram dims)"
            )
        if not self.layer_ids:
            raise ValueError("layer_ids must name at least one layer (0-based), got ()")
        for i, layer in enumerate(self.layer_ids):
            _check_int(f"layer_ids[{i}]", layer, 0)
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids must be distinct, got {self.layer_ids}")
        if self.pad_id is not None:
            _check_int("pad_id", self.pad_id, 0)
        _check_int("seed", self.seed, 0)
        _check_int("kernel_size", self.kernel_size, 1)
        _check_int("hc_mult", self.hc_mult, 1)
        if self.gate not in ("signed_sqrt", "plain", "none"):
            raise ValueError(
                f"gate must be 'signed_sqrt', 'plain' or 'none' (alpha = 1), got {self.gate!r}"
            )
        for name in (*_ABLATION_SWITCHES, "bias", "gate_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not self.multi_branch and self.hc_mult == 1:
            raise ValueError(
                "multi_branch=False needs hc_mult > 1: with one residual stream there is a single "
                "branch, nothing to fuse"
            )
        if self.norm_eps is not None:
            _check_float("norm_eps", self.norm_eps, 0.0)
        _check_float("conv_norm_eps", self.conv_norm_eps, 0.0)
        if self.multiplier_scheme not in ("numpy", "splitmix64"):
            raise ValueError(
                "multiplier_scheme must be 'numpy' (demo, DeepSeek-V4.1) or 'splitmix64' "
                f"(Qwen4-Exp), got {self.multiplier_scheme!r}"
            )
        if self.hash_layer_key not in ("layer_id", "layer_index"):
            raise ValueError(
                "hash_layer_key must be 'layer_id' (demo, DeepSeek-V4.1) or 'layer_index' "
                f"(Qwen4-Exp: the layer's index in layer_ids), got {self.hash_layer_key!r}"
            )
        if self.reset_token is not None:
            _check_int("reset_token", self.reset_token, 0)
        _check_int("table_rows_multiple", self.table_rows_multiple, 1)

    # --- derived -----------------------------------------------------------------------------
    @property
    def num_orders(self) -> int:
        """N - 1: how many n-gram orders are hashed (2..N)."""
        return self.max_ngram - 1

    @property
    def num_heads(self) -> int:
        """H = (N - 1) * K hash heads per Engram layer."""
        return self.num_orders * self.heads_per_ngram

    @property
    def head_dim(self) -> int:
        """Width of one head's row: embed_dim_per_ngram / K."""
        return self.embed_dim_per_ngram // self.heads_per_ngram

    @property
    def memory_dim(self) -> int:
        """E = d_mem = (N - 1) * embed_dim_per_ngram, the width of the retrieved e_t."""
        return self.num_orders * self.embed_dim_per_ngram

    @property
    def num_branches(self) -> int:
        """Inputs Engram gates separately: ``hc_mult``, or 1 when ``multi_branch`` is off."""
        return self.hc_mult if self.multi_branch else 1

    # --- presets and serialisation -----------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> EngramConfig:
        """Named configurations: SPEC §3's ``demo``, ``engram-27b``, ``engram-40b``, ``tiny``, and
        ``deepseek-v4.1-flash`` (the released model's Engram, DEEPSEEK_V41_ENGRAM.md §1)."""
        presets: dict[str, dict[str, Any]] = {
            "demo": {},
            # Paper layers [2, 15] are 1-based; stored 0-based. d_mem 1280 = 2 orders x 640.
            "engram-27b": dict(
                table_sizes=(2_262_400, 2_262_400), embed_dim_per_ngram=640, layer_ids=(1, 14)
            ),
            "engram-40b": dict(
                table_sizes=(7_239_680, 7_239_680), embed_dim_per_ngram=640, layer_ids=(1, 14)
            ),
            # DeepSeek-V4.1-Flash (DEEPSEEK_V41_ENGRAM.md §1, §5): one prime-search start for
            # all orders, 8 heads x 256 values, no biases, no short conv, fp32 gate with eps
            # 1e-20; pad_id is the raw 2 of its tokenizer. engramlm.deepseek_v41 checks the
            # table rows and multipliers against the release.
            "deepseek-v4.1-flash": dict(
                table_sizes=(16_000_000,) * 3,
                max_ngram=4,
                embed_dim_per_ngram=8 * 256,
                layer_ids=(1, 14),
                pad_id=2,
                short_conv=False,
                bias=False,
                norm_eps=1e-20,
                gate_fp32=True,
            ),
            "tiny": dict(
                table_sizes=(5003, 5003),
                heads_per_ngram=4,
                embed_dim_per_ngram=64,
                layer_ids=(1,),
                hc_mult=1,
                # For models on synthetic ids, which have no special token to resolve the
                # filler from: raw id 0 (EOS in every tokenizer trained here).
                pad_id=0,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown EngramConfig preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["table_sizes"] = list(self.table_sizes)
        d["layer_ids"] = list(self.layer_ids)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _NEWER_FIELDS:  # left out at their defaults: older configs stay equal
            if d[name] == defaults[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngramConfig:
        check_fields(cls, d)
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """The decoder-only backbone around Engram (SPEC §3; built by ``engramlm.model.EngramLM``).

    Standard GQA attention with RoPE replaces the paper's MLA (SPEC §6 allows it). The FFN is a
    dense SwiGLU in the first ``first_dense_layers`` layers and everywhere when
    ``num_experts == 0``; otherwise a DeepSeek-V3 MoE with ``num_experts`` routed experts (top
    ``experts_per_token``), ``num_shared_experts`` always-on experts, sigmoid affinities and
    auxiliary-loss-free balancing (``moe_bias_update_rate``, arXiv 2408.15664); the top-k gate
    weights sum to ``moe_routed_scale`` (V3's routed scaling factor). ``hc_mult`` is M,
    the number of residual streams (1 = plain residual, 4 = the paper's mHC). ``engram`` places
    Engram modules at ``engram.layer_ids`` (0-based); ``compressed_vocab_size`` is V' of the
    tokenizer compression (SPEC §2.1), ``None`` meaning no compression (V' = V).
    ``overencoding`` adds the Over-Encoding baseline (arXiv 2501.16975) to the input embedding:
    hashed n-gram rows averaged into the token embedding (``engramlm.overencoding``); it reuses
    EngramConfig's n-gram, head, table and width fields, needs ``layer_ids=(0,)`` and ignores
    the gate, conv and ``hc_mult`` fields.
    """

    vocab_size: int = 256  # V; training sets it to the tokenizer's
    num_layers: int = 2  # Transformer blocks
    hidden_size: int = 64  # D, the residual width
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention)
    ffn_hidden_size: int = 176  # dense SwiGLU intermediate (~8/3 D)
    num_experts: int = 0  # routed experts; 0 = dense FFN in every layer
    experts_per_token: int = 0  # top-k
    num_shared_experts: int = 0  # always-on experts beside the routed ones
    expert_hidden_size: int = 0  # SwiGLU intermediate of one (routed or shared) expert
    first_dense_layers: int = 1  # leading layers with a dense FFN (paper: 1)
    moe_bias_update_rate: float = 1e-3  # gamma of loss-free balancing
    moe_routed_scale: float = 1.0  # V3's routed scaling factor: the top-k gate weights sum to it
    rope_theta: float = 10000.0  # RoPE base frequency
    max_seq_len: int = 256  # longest context, in tokens
    norm_eps: float = 1e-6  # RMSNorm epsilon
    hc_mult: int = 1  # M residual streams
    tie_embeddings: bool = False  # LM head shares the input embedding
    engram: EngramConfig | None = None  # Engram memory; None = none
    compressed_vocab_size: int | None = None  # V'; None = vocab_size (no compression)
    overencoding: EngramConfig | None = None  # Over-Encoding baseline at the input embedding

    def __post_init__(self) -> None:
        if isinstance(self.engram, dict):
            object.__setattr__(self, "engram", EngramConfig.from_dict(self.engram))
        if not getattr(self.engram, "compress_tokens", True):
            # Engram hashes raw ids ("w/o tokenizer compression"): the model has no V', even
            # when the training loop binds the tokenizer's (train._bind_vocab).
            object.__setattr__(self, "compressed_vocab_size", None)
        if isinstance(self.overencoding, dict):
            object.__setattr__(self, "overencoding", EngramConfig.from_dict(self.overencoding))
        _check_int("vocab_size", self.vocab_size, 1)
        _check_int("num_layers", self.num_layers, 1)
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("num_heads", self.num_heads, 1)
        _check_int("num_kv_heads", self.num_kv_heads, 1, self.num_heads)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"head dim hidden_size/num_heads = {self.hidden_size // self.num_heads} must be "
                "even for RoPE (rotates pairs of channels)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be divisible by num_kv_heads="
                f"{self.num_kv_heads} (grouped-query attention shares each kv head)"
            )
        _check_int("ffn_hidden_size", self.ffn_hidden_size, 1)
        _check_int("num_experts", self.num_experts, 0)
        _check_int("first_dense_layers", self.first_dense_layers, 0, self.num_layers)
        if self.num_experts:
            _check_int("experts_per_token", self.experts_per_token, 1, self.num_experts)
            _check_int("num_shared_experts", self.num_shared_experts, 0)
            _check_int("expert_hidden_size", self.expert_hidden_size, 1)
        else:
            for name in ("experts_per_token", "num_shared_experts", "expert_hidden_size"):
                value = getattr(self, name)
                if value != 0:
                    raise ValueError(
                        f"{name}={value} needs routed experts, but num_experts=0 (dense FFN); "
                        f"set num_experts >= 1 or {name}=0"
                    )
        _check_float("moe_bias_update_rate", self.moe_bias_update_rate, 0.0, inclusive=True)
        _check_float("moe_routed_scale", self.moe_routed_scale, 0.0)
        _check_float("rope_theta", self.rope_theta, 0.0)
        _check_int("max_seq_len", self.max_seq_len, 1)
        _check_float("norm_eps", self.norm_eps, 0.0)
        _check_int("hc_mult", self.hc_mult, 1)
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.compressed_vocab_size is not None:
            _check_int("compressed_vocab_size", self.compressed_vocab_size, 1, self.vocab_size)
        if self.engram is not None:
            self._check_engram(self.engram)
        if self.overencoding is not None:
            self._check_overencoding(self.overencoding)

    def _check_overencoding(self, oe: EngramConfig) -> None:
        if not isinstance(oe, EngramConfig):
            raise TypeError(
                f"overencoding must be an EngramConfig or None, got {type(oe).__name__}"
            )
        if oe.layer_ids != (0,):
            raise ValueError(
                f"overencoding.layer_ids must be (0,): Over-Encoding acts on the input "
                f"embedding, got {oe.layer_ids}"
            )
        if oe.pad_id is not None and oe.pad_id >= self.vocab_size:
            raise ValueError(
                f"overencoding.pad_id={oe.pad_id} must be a raw token id in [0, {self.vocab_size})"
            )

    def _check_engram(self, engram: EngramConfig) -> None:
        if not isinstance(engram, EngramConfig):
            raise TypeError(f"engram must be an EngramConfig or None, got {type(engram).__name__}")
        for i, layer in enumerate(engram.layer_ids):
            if layer >= self.num_layers:
                raise ValueError(
                    f"engram.layer_ids[{i}]={layer} must be in [0, {self.num_layers}) "
                    f"(0-based, num_layers={self.num_layers})"
                )
        if engram.hc_mult != self.hc_mult:
            raise ValueError(
                f"engram.hc_mult={engram.hc_mult} must equal hc_mult={self.hc_mult}: Engram "
                "gates each residual stream of the backbone (SPEC §2.8)"
            )
        for name in ("pad_id", "reset_token"):
            value = getattr(engram, name)
            if value is not None and value >= self.vocab_size:
                raise ValueError(
                    f"engram.{name}={value} must be a raw token id in [0, {self.vocab_size})"
                )

    # --- derived -----------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def hashing_vocab_size(self) -> int:
        """V' used by the hash: ``compressed_vocab_size`` or ``vocab_size`` without compression."""
        return self.vocab_size if self.compressed_vocab_size is None else self.compressed_vocab_size

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether ``layer_id`` (0-based) has an MoE FFN rather than a dense SwiGLU."""
        return self.num_experts > 0 and layer_id >= self.first_dense_layers

    def has_engram(self, layer_id: int) -> bool:
        return self.engram is not None and layer_id in self.engram.layer_ids

    # --- presets and serialisation -----------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Named configurations: ``tiny`` (dense), ``tiny-moe``, ``tiny-engram`` (MoE + Engram at
        layer 1), ``tiny-mhc`` (MoE + Engram, 4 residual streams). For tests and CPU demos."""
        moe = dict(
            num_layers=3,
            num_experts=8,
            experts_per_token=2,
            num_shared_experts=1,
            expert_hidden_size=32,
        )
        presets: dict[str, dict[str, Any]] = {
            "tiny": {},
            "tiny-moe": moe,
            "tiny-engram": {**moe, "engram": EngramConfig.preset("tiny")},
            "tiny-mhc": {**moe, "hc_mult": 4, "engram": EngramConfig.preset("tiny", hc_mult=4)},
        }
        if name not in presets:
            raise ValueError(f"unknown ModelConfig preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["engram"] = None if self.engram is None else self.engram.to_dict()
        # Left out when unset, so configs (and run digests, resume checks) written before the
        # field existed are unchanged.
        oe = d.pop("overencoding")
        if oe is not None:
            d["overencoding"] = oe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; nested ``engram``/``overencoding`` dicts are validated as
        EngramConfig."""
        check_fields(cls, d)
        d = dict(d)
        for name in ("engram", "overencoding"):
            if isinstance(d.get(name), dict):
                d[name] = EngramConfig.from_dict(d[name])
        return cls(**d)
