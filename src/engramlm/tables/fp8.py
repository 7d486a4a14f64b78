"""fp8 table rows: float8_e4m3fn values with one E8M0 scale per 32 consecutive values.

DeepSeek-V4.1-Flash stores each Engram table as ``embed.weight`` float8_e4m3fn [N, dim] and
``embed.scale`` float8_e8m0fnu [N, dim/32] (DEEPSEEK_V41_ENGRAM.md §4): row r, channel j is

    value = fp8_e4m3(weight[r, j]) * 2^(scale[r, j // 32] - 127)

(E8M0 byte 255 is NaN, byte 0 is 2^-127; torch's float8_e8m0fnu decodes both so). The product
is exact in float32, so :func:`dequantize_rows` is bit-exact with the spec's fp32 dequantisation.

The tiers keep such a table as *packed rows*: one uint8 row of ``dim`` value bytes followed by
its ``dim/32`` scale bytes (264 bytes for dim 256), so a row and its scales are one read from
disk and a 98 GB table stays 98 GB (+3%) in memory or on disk. Packed rows are written as they
come from a checkpoint and dequantised on lookup; they are never re-quantised (a float row has
many fp8 x scale spellings, so quantising would not give back the checkpoint's bytes), which is
why fp8 tables are read-only: serving, not training.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
BLOCK = 32  # values per E8M0 scale, along a row (and 32x32 blocks for dense fp8 weights)


def packed_width(dim: int) -> int:
    """Bytes of one packed row of ``dim`` fp8 values: dim + dim/32 scale bytes."""
    if dim % BLOCK:
        raise ValueError(
            f"fp8 rows need a width that is a multiple of {BLOCK} (one E8M0 scale per {BLOCK} "
            f"values), got dim={dim}"
        )
    return dim + dim // BLOCK


def pack_rows(values: Tensor, scales: Tensor) -> Tensor:
    """([n, dim] float8_e4m3fn, [n, dim/32] float8_e8m0fnu) -> [n, dim + dim/32] uint8 rows."""
    n, dim = values.shape
    if values.dtype != FP8 or scales.dtype != E8M0:
        raise TypeError(
            f"packing needs float8_e4m3fn values and float8_e8m0fnu scales, got {values.dtype} "
            f"and {scales.dtype}"
        )
    if tuple(scales.shape) != (n, packed_width(dim) - dim):
        raise ValueError(
            f"scales must be [n, dim/{BLOCK}] = [{n}, {dim // BLOCK}] for values [{n}, {dim}], "
            f"got {list(scales.shape)}"
        )
    return torch.cat([values.view(torch.uint8), scales.view(torch.uint8)], dim=1)


def dequantize_rows(packed: Tensor, dim: int) -> Tensor:
    """[..., dim + dim/32] uint8 packed rows -> [..., dim] float32, exactly (module docstring)."""
    values = packed[..., :dim].view(FP8).float()  # [..., dim]
    scales = packed[..., dim:].contiguous().view(E8M0).float()  # [..., dim/32]
    return (values.unflatten(-1, (-1, BLOCK)) * scales.unsqueeze(-1)).flatten(-2)


def dequantize_blocks(weight: Tensor, scale: Tensor) -> Tensor:
    """A dense fp8 weight with 32x32-block E8M0 scales -> float32 (V4.1's ``wkv``, spec §5).

    ``weight`` float8_e4m3fn [R, C], ``scale`` float8_e8m0fnu [ceil(R/32), ceil(C/32)];
    W[i, j] = fp8(weight[i, j]) * 2^(scale[i // 32, j // 32] - 127).
    """
    R, C = weight.shape
    blocks = (-(-R // BLOCK), -(-C // BLOCK))
    if weight.dtype != FP8 or scale.dtype != E8M0:
        raise TypeError(
            f"expected a float8_e4m3fn weight and float8_e8m0fnu scales, got {weight.dtype} and "
            f"{scale.dtype}"
        )
    if tuple(scale.shape) != blocks:
        raise ValueError(
            f"scale of a [{R}, {C}] fp8 weight must be [ceil({R}/{BLOCK}), ceil({C}/{BLOCK})] = "
            f"{list(blocks)} ({BLOCK}x{BLOCK} blocks), got {list(scale.shape)}"
        )
    factor = scale.float().repeat_interleave(BLOCK, 0)[:R].repeat_interleave(BLOCK, 1)[:, :C]
    return weight.float() * factor
