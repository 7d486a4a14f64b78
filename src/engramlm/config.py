"""Configuration dataclasses: frozen, validated at construction, round-trip through dicts.

Every error names the field, the offending value and what would be valid. Variants are made
with ``dataclasses.replace(cfg, ...)``; derived values are properties, never stored fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

GateForm = Literal["signed_sqrt", "plain"]


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


@dataclass(frozen=True)
class EngramConfig:
    """Hyper-parameters of the Engram memory (SPEC §2, §3).

    Defaults are the official demo's (``engram_demo_v1.py``): tables of 129280*5 rows per head
    and order, N=3, K=8 heads, 512 dims per order, layers (1, 15) 0-based, pad id 2, seed 0,
    kernel 4, 4 residual branches. Where the paper and the demo differ we follow the demo and
    say so: the gate's signed square root (``gate="signed_sqrt"``; ``"plain"`` is the paper's
    formula) and bias terms on the key/value projections (the demo's ``nn.Linear`` default).
    Layer ids are 0-based: the paper's "layer 2" is ``layer_ids=(1,)``.
    """

    table_sizes: tuple[int, ...] = (129280 * 5, 129280 * 5)  # per order 2..N, before primes
    max_ngram: int = 3  # N; orders 2..N are hashed
    heads_per_ngram: int = 8  # K
    embed_dim_per_ngram: int = 512  # width of one order's concatenated heads
    layer_ids: tuple[int, ...] = (1, 15)  # 0-based
    pad_id: int = 2  # raw id used before the sequence start (compressed before hashing)
    seed: int = 0
    kernel_size: int = 4  # short conv kernel w; dilation is max_ngram
    hc_mult: int = 4  # M residual branches (1 = plain residual)
    gate: GateForm = "signed_sqrt"

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
        _check_int("pad_id", self.pad_id, 0)
        _check_int("seed", self.seed, 0)
        _check_int("kernel_size", self.kernel_size, 1)
        _check_int("hc_mult", self.hc_mult, 1)
        if self.gate not in ("signed_sqrt", "plain"):
            raise ValueError(f"gate must be 'signed_sqrt' or 'plain', got {self.gate!r}")

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

    # --- presets and serialisation -----------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> EngramConfig:
        """Named configurations from SPEC §3: ``demo``, ``engram-27b``, ``engram-40b``, ``tiny``."""
        presets: dict[str, dict[str, Any]] = {
            "demo": {},
            # Paper layers [2, 15] are 1-based; stored 0-based. d_mem 1280 = 2 orders x 640.
            "engram-27b": dict(
                table_sizes=(2_262_400, 2_262_400), embed_dim_per_ngram=640, layer_ids=(1, 14)
            ),
            "engram-40b": dict(
                table_sizes=(7_239_680, 7_239_680), embed_dim_per_ngram=640, layer_ids=(1, 14)
            ),
            "tiny": dict(
                table_sizes=(5003, 5003),
                heads_per_ngram=4,
                embed_dim_per_ngram=64,
                layer_ids=(1,),
                hc_mult=1,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown EngramConfig preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["table_sizes"] = list(self.table_sizes)
        d["layer_ids"] = list(self.layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngramConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EngramConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
