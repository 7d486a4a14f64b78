"""Suffix n-grams and multi-head hashing, bit-exact with the official demo (SPEC §2.2-2.3).

Everything here is a pure function of compressed token ids and the config: same ids in, same
rows out, on any device, in the data loader or inside ``forward``. That is what lets tables be
prefetched, sharded and offloaded.

For order n at position t, with multipliers m_k (odd, per layer) and compressed ids x':

    mix_{t,n} = XOR_{k=0}^{n-1} (x'_{t-k} * m_k)          (x'_{t-k} = pad before the start)
    z_{t,n,j} = mix_{t,n} mod p_{n,j}                      (p_{n,j}: a distinct prime per head)

Products stay below 2^63 by construction (m_k * x' < floor((2^63-1)/V') * V'), so int64
arithmetic in numpy and torch agree exactly.

Variants (``EngramConfig`` fields): multipliers drawn by numpy (demo, DeepSeek-V4.1) or by
SplitMix64 (Qwen4-Exp), seeded by the layer's id or its index among the Engram layers; a
history that restarts after a reset token (Qwen4-Exp's EOS); DEAD (-1) tokens, which are never
hashed and block every older look-back (DeepSeek-V4.1's masked positions). With both, the
look-back x'_{t-k} becomes the pad once any position in [t-k, t-1] holds a reset token or DEAD,
and a DEAD current token hashes as all pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engramlm.config import EngramConfig

INT64_MAX = 2**63 - 1
DEAD = -1  # "no token here" (masked/padding): never hashed, blocks older look-backs
_UINT64 = 2**64 - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio, odd)

# Deterministic Miller-Rabin witnesses: exact for every n < 3.3e24 (all int64 values).
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Exact primality for n < 3.3e24 (deterministic Miller-Rabin)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def head_moduli(
    *,
    layer_ids: Sequence[int],
    table_sizes: Sequence[int],
    heads_per_ngram: int,
    max_ngram: int,
) -> dict[int, tuple[int, ...]]:
    """Prime table size of every hash head of every Engram layer (SPEC §2.3).

    Layers in ``layer_ids`` order, then orders 2..N, then heads 0..K-1: each head takes the
    smallest prime strictly above ``start`` that no earlier head of any layer used, where
    ``start`` is ``table_sizes[n-2] - 1`` for head 0 and the previous head's prime after.
    Returns ``{layer_id: (p_{2,0}, ..., p_{2,K-1}, p_{3,0}, ...)}``, H = (N-1)K entries each.
    """
    if len(table_sizes) != max_ngram - 1:
        raise ValueError(
            f"table_sizes needs {max_ngram - 1} entries (orders 2..{max_ngram}), "
            f"got {len(table_sizes)}"
        )
    used: set[int] = set()
    moduli: dict[int, tuple[int, ...]] = {}
    for layer in layer_ids:
        primes: list[int] = []
        for size in table_sizes:
            candidate = size - 1
            for _ in range(heads_per_ngram):
                candidate += 1
                while not is_prime(candidate) or candidate in used:
                    candidate += 1
                used.add(candidate)
                primes.append(candidate)
        moduli[layer] = tuple(primes)
    return moduli


def splitmix64(state: int) -> int:
    """One SplitMix64 output for ``state`` (Steele, Lea & Flood 2014), on unsigned 64 bits."""
    z = (state + _GOLDEN_GAMMA) & _UINT64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _UINT64
    return z ^ (z >> 31)


def layer_multipliers(
    *,
    seed: int,
    layer_id: int,
    max_ngram: int,
    compressed_vocab_size: int,
    scheme: str = "numpy",
) -> tuple[int, ...]:
    """The N odd multipliers m_0..m_{N-1} of one layer (SPEC §2.3).

    ``half = max(1, floor((2^63-1) / V') // 2)`` and ``m = 2r + 1`` with r in [0, half):
    ``scheme="numpy"`` (demo, DeepSeek-V4.1) draws
    ``numpy.random.default_rng(seed + 10007 * layer_id).integers(0, half, N)``;
    ``scheme="splitmix64"`` (Qwen4-Exp) takes ``r_k = splitmix64(s + gamma * (k + 1)) mod half``
    with ``s = seed + 10007 * layer_id`` (the caller passes the layer's index as ``layer_id``
    when the variant keys layers by index).
    """
    if compressed_vocab_size < 1:
        raise ValueError(f"compressed_vocab_size must be >= 1, got {compressed_vocab_size}")
    half = max(1, (INT64_MAX // compressed_vocab_size) // 2)
    base = seed + 10007 * layer_id
    if scheme == "numpy":
        rng = np.random.default_rng(base)
        r = [int(x) for x in rng.integers(0, half, size=max_ngram, dtype=np.int64)]
    elif scheme == "splitmix64":
        r = [
            splitmix64((base + _GOLDEN_GAMMA * (k + 1)) & _UINT64) % half for k in range(max_ngram)
        ]
    else:
        raise ValueError(f"multiplier scheme must be 'numpy' or 'splitmix64', got {scheme!r}")
    multipliers = tuple(2 * x + 1 for x in r)
    # Our invariant, true by construction: no product m * x' can overflow int64.
    assert all(m * (compressed_vocab_size - 1) <= INT64_MAX for m in multipliers)
    return multipliers


def check_ids(ids: Tensor, vocab_size: int, what: str = "token id") -> None:
    """Raise a ``ValueError``/``TypeError`` naming the first id outside [0, vocab_size)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{what}s must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{what}s must be torch.int64 (torch.long), got {ids.dtype}")
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"{what} {int(ids[pos])} at position {pos} is out of range [0, {vocab_size}); "
            "check that the tokenizer matches the model's vocabulary"
        )


def hash_ngrams(
    compressed_ids: Tensor,
    multipliers: Tensor,
    moduli: Tensor,
    *,
    pad_id: int,
    prefix: Tensor | None = None,
    reset_id: int | None = None,
    dead: bool = False,
) -> Tensor:
    """The hashing kernel: [B, T] compressed ids -> [B, T, H] head-local rows (int64).

    ``multipliers`` is [N], ``moduli`` is [H] with H = (N-1)K, order 2's heads first.
    ``prefix`` ([B, N-1], optional) holds the compressed ids just before ``compressed_ids``
    (pad-filled for a sequence shorter than that): hashing a continuation with the previous
    tokens as prefix gives exactly the rows of hashing the whole sequence. Without a prefix
    the sequence starts fresh and is left-padded with ``pad_id`` (SPEC §2.2).

    ``reset_id`` (a compressed id) restarts the history after each occurrence; ``dead=True``
    lets ids (and the prefix) hold :data:`DEAD`. Either way the look-back ``x'_{t-k}`` is
    replaced by the pad once a reset token or DEAD lies in positions [t-k, t-1], and a DEAD
    current token hashes as all pads (DeepSeek-V4.1's cumulative blocking).
    """
    B, T = compressed_ids.shape
    N = multipliers.numel()
    K = moduli.numel() // (N - 1)
    if prefix is None:
        prefix = compressed_ids.new_full((B, N - 1), pad_id)
    elif prefix.shape != (B, N - 1):
        raise ValueError(f"prefix must be [B, N-1] = [{B}, {N - 1}], got {list(prefix.shape)}")
    full = torch.cat([prefix, compressed_ids], dim=1)  # [B, N-1+T]
    blocking = dead or reset_id is not None
    if blocking:
        stops = full == DEAD if dead else torch.zeros_like(full, dtype=torch.bool)
        if reset_id is not None:
            stops = stops | (full == reset_id)  # [B, N-1+T]: blocks older look-backs
        blocked = compressed_ids == DEAD  # [B, T]: a DEAD current token blocks everything
        current = compressed_ids.masked_fill(blocked, pad_id)
    else:
        current = compressed_ids
    mix = current * multipliers[0]  # [B, T]
    mixes = []
    for k in range(1, N):
        x_k = full[:, N - 1 - k : N - 1 - k + T]  # x'_{t-k}, [B, T]
        if blocking:
            blocked = blocked | stops[:, N - 1 - k : N - 1 - k + T]
            x_k = x_k.masked_fill(blocked, pad_id)
        mix = torch.bitwise_xor(mix, x_k * multipliers[k])
        mixes.append(mix)
    per_order = torch.stack(mixes, dim=-1).unsqueeze(-1)  # [B, T, N-1, 1]
    rows = torch.remainder(per_order, moduli.view(N - 1, K))  # [B, T, N-1, K], in [0, p)
    return rows.flatten(-2)  # [B, T, H], order 2's heads first


def ngram_hash(
    compressed_ids: Tensor,
    *,
    seed: int,
    layer_id: int,
    layer_ids: Sequence[int],
    table_sizes: Sequence[int],
    heads_per_ngram: int,
    max_ngram: int,
    pad_id: int,
    compressed_vocab_size: int,
) -> Tensor:
    """Head-local hash ids of one layer, [B, T] -> [B, T, (N-1)K] int64 (SPEC §2.3).

    The reference entry point, matching the conformance vectors field for field. ``pad_id``
    is the *compressed* pad id. Recomputes the constants on every call; models use
    :class:`NgramHasher`, which computes them once.
    """
    if layer_id not in layer_ids:
        raise ValueError(f"layer_id {layer_id} is not one of layer_ids {tuple(layer_ids)}")
    check_ids(compressed_ids, compressed_vocab_size, "compressed id")
    mult = layer_multipliers(
        seed=seed,
        layer_id=layer_id,
        max_ngram=max_ngram,
        compressed_vocab_size=compressed_vocab_size,
    )
    mods = head_moduli(
        layer_ids=layer_ids,
        table_sizes=table_sizes,
        heads_per_ngram=heads_per_ngram,
        max_ngram=max_ngram,
    )[layer_id]
    device = compressed_ids.device
    return hash_ngrams(
        compressed_ids,
        torch.tensor(mult, dtype=torch.int64, device=device),
        torch.tensor(mods, dtype=torch.int64, device=device),
        pad_id=pad_id,
    )


class NgramHasher(nn.Module):
    """Hash constants of every Engram layer, computed once, kept as (non-saved) buffers.

    ``hasher(ids, layer_id)`` gives [B, T, H] head-local rows; ``hasher.all_layers(ids)`` gives
    every layer's at once (what the data loader precomputes and the prefetcher consumes).
    ``multiplier_scheme``, ``hash_layer_key`` and ``reset_id`` select the variant (see
    :class:`~engramlm.config.EngramConfig`); ``dead=True`` accepts :data:`DEAD` ids.
    """

    def __init__(
        self,
        *,
        seed: int,
        layer_ids: Sequence[int],
        table_sizes: Sequence[int],
        heads_per_ngram: int,
        max_ngram: int,
        pad_id: int,
        compressed_vocab_size: int,
        multiplier_scheme: str = "numpy",
        hash_layer_key: str = "layer_id",
        reset_id: int | None = None,
        dead: bool = False,
    ) -> None:
        super().__init__()
        if pad_id is None:
            raise ValueError(
                "pad_id is unset: resolve it from the tokenizer first "
                "(engramlm.tokenization.resolve_pad_id: its pad, else EOS)"
            )
        for name, value in (("pad_id", pad_id), ("reset_id", reset_id)):
            if value is not None and not 0 <= value < compressed_vocab_size:
                raise ValueError(
                    f"compressed {name} {value} must lie in [0, {compressed_vocab_size})"
                )
        self.layer_ids = tuple(layer_ids)
        self.pad_id = pad_id
        self.reset_id = reset_id
        self.dead = dead
        self.max_ngram = max_ngram
        self.compressed_vocab_size = compressed_vocab_size
        moduli = head_moduli(
            layer_ids=layer_ids,
            table_sizes=table_sizes,
            heads_per_ngram=heads_per_ngram,
            max_ngram=max_ngram,
        )
        self.moduli = {layer: moduli[layer] for layer in self.layer_ids}
        for index, layer in enumerate(self.layer_ids):
            mult = layer_multipliers(
                seed=seed,
                layer_id=layer if hash_layer_key == "layer_id" else index,
                max_ngram=max_ngram,
                compressed_vocab_size=compressed_vocab_size,
                scheme=multiplier_scheme,
            )
            self.register_buffer(f"mult_{layer}", torch.tensor(mult), persistent=False)
            self.register_buffer(f"mod_{layer}", torch.tensor(moduli[layer]), persistent=False)
        # Every layer's constants stacked, [L, N] and [L, H], for the fused decode kernel.
        mults = [getattr(self, f"mult_{layer}") for layer in self.layer_ids]
        mods = [getattr(self, f"mod_{layer}") for layer in self.layer_ids]
        H = (max_ngram - 1) * heads_per_ngram
        mult_all = torch.stack(mults) if mults else torch.zeros(0, max_ngram, dtype=torch.int64)
        mod_all = torch.stack(mods) if mods else torch.zeros(0, H, dtype=torch.int64)
        self.register_buffer("mult_all", mult_all, persistent=False)
        self.register_buffer("mod_all", mod_all, persistent=False)

    @classmethod
    def from_config(
        cls,
        config: EngramConfig,
        *,
        pad_id: int,
        compressed_vocab_size: int,
        reset_id: int | None = None,
        dead: bool = False,
    ) -> NgramHasher:
        """The hasher of an :class:`EngramConfig`; ``pad_id`` and ``reset_id`` are *compressed*
        ids (of ``config.pad_id`` and ``config.reset_token``)."""
        return cls(
            seed=config.seed,
            layer_ids=config.layer_ids,
            table_sizes=config.table_sizes,
            heads_per_ngram=config.heads_per_ngram,
            max_ngram=config.max_ngram,
            pad_id=pad_id,
            compressed_vocab_size=compressed_vocab_size,
            multiplier_scheme=config.multiplier_scheme,
            hash_layer_key=config.hash_layer_key,
            reset_id=reset_id,
            dead=dead,
        )

    def forward(
        self, compressed_ids: Tensor, layer_id: int, prefix: Tensor | None = None
    ) -> Tensor:
        """[B, T] compressed ids -> [B, T, H] head-local rows of ``layer_id``."""
        return hash_ngrams(
            compressed_ids,
            getattr(self, f"mult_{layer_id}"),
            getattr(self, f"mod_{layer_id}"),
            pad_id=self.pad_id,
            prefix=prefix,
            reset_id=self.reset_id,
            dead=self.dead,
        )

    def all_layers(self, compressed_ids: Tensor, prefix: Tensor | None = None) -> dict[int, Tensor]:
        """{layer_id: [B, T, H]} for every Engram layer."""
        return {layer: self(compressed_ids, layer, prefix) for layer in self.layer_ids}

    def fused_step(
        self, ops: Any, input_ids: Tensor, lookup: Tensor | None, prefix: Tensor | None
    ) -> tuple[dict[int, Tensor], Tensor]:
        """:meth:`all_layers` and :meth:`next_prefix` of raw ``input_ids`` [B, T] in one call of
        the fused kernel ``ops.hash_step`` (``engramlm.kernels.fused_ops()``), compressing them
        with ``lookup`` [V] (None: already compressed) on the way; integer-exact. CPU tensors
        only (``engramlm.engram.fusable``)."""
        rows, prefix = ops.hash_step(
            input_ids,
            lookup,
            prefix,
            self.mult_all,
            self.mod_all,
            self.pad_id,
            -1 if self.reset_id is None else self.reset_id,
            self.dead,
        )
        return dict(zip(self.layer_ids, rows, strict=True)), prefix

    def next_prefix(self, prefix: Tensor | None, compressed_ids: Tensor) -> Tensor:
        """The decode state after ``compressed_ids``: the last N-1 ids, pad-filled. [B, N-1]"""
        B = compressed_ids.shape[0]
        if prefix is None:
            prefix = compressed_ids.new_full((B, self.max_ngram - 1), self.pad_id)
        return torch.cat([prefix, compressed_ids], dim=1)[:, -(self.max_ngram - 1) :]
