"""Serve DeepSeek-V4.1-shaped fp8 Engram tables larger than this machine's RAM from disk.

Writes a V4.1-format checkpoint (config.json, one safetensors shard per Engram layer plus
``model.safetensors.index.json``; real tensor names and dtypes: F8_E4M3 tables of 256-wide rows
with F8_E8M0 scales per 32 values, 24 hash columns, an fp8 ``wkv`` with 32x32 block scales) whose
tables total ``--table-gb``, streaming every byte (never a whole table in memory). Then
``engramlm.deepseek_v41.load_engram(tables="disk")`` streams the rows into the disk tier, the
checkpoint is deleted, the tables' pages are dropped from the page cache, and B sequences are
decoded through the Engram layers (layer 1's output is layer 14's input): a prefill, then one
token per step, each step's rows prefetched at its start. Prints per-step time, table rows
read from the file per step, the row cache's hit rate, the process's peak RSS and the RAM.

The tables are V4.1's shape but random (seeded), the hidden width is ``--hidden`` (V4.1: 5120;
smaller keeps the CPU matmul of ``wkv`` short) and the compressed ids follow a Zipf law over
V4.1's 99,092 compressed ids, as n-gram traffic does (paper §6.4).

    .venv/bin/python recipes/deepseek_v41_disk.py --dir /var/tmp/v41 [--table-gb 28] [--layers 1]

Needs ~2 x table-gb of free disk while loading (checkpoint + tables); deleted at the end unless
--keep. ``--table-gb 0.05`` runs in seconds (what the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engramlm.deepseek_v41 import DeepSeekV41Config, DeepSeekV41Engram, load_engram, table_bytes
from engramlm.hashing import head_moduli
from engramlm.tables import fp8
from engramlm.tables.disk import drop_page_cache

CHUNK_ROWS = 1 << 18
COMPRESSED_VOCAB = 99092


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` (``VmHWM``, ``VmRSS``) or ``/proc/meminfo`` field, in kB."""
    source = "/proc/meminfo" if field == "MemTotal" else "/proc/self/status"
    with open(source) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def v41_text_config(table_gb: float, hidden: int, layer_ids: tuple[int, ...]) -> dict[str, Any]:
    """A V4.1 ``text_config`` whose fp8 tables (rows + scales) total about ``table_gb`` GB."""
    row_bytes = fp8.packed_width(256)
    rows = table_gb * 1e9 / len(layer_ids) / row_bytes
    base = dict(
        engram_layer_ids=list(layer_ids),
        engram_max_ngram_size=4,
        engram_vocab_size=max(64, int(rows / 24)),  # 24 columns of ~vocab_size rows each
        engram_n_heads=8,
        engram_head_dim=256,
        engram_pad_token_id=2,
        engram_compressed_vocab_size=COMPRESSED_VOCAB,
        hc_mult=4,
        hidden_size=hidden,
        rms_norm_eps=1e-20,
    )
    moduli = head_moduli(
        layer_ids=layer_ids,
        table_sizes=(base["engram_vocab_size"],) * 3,
        heads_per_ngram=8,
        max_ngram=4,
    )
    base["engram_num_embeddings"] = [sum(moduli[layer]) for layer in layer_ids]
    return base


def _fp8_bytes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random e4m3 bit patterns, never NaN (0x7f / 0xff)."""
    b = rng.integers(0, 255, size=shape, dtype=np.uint8)
    b[(b & 0x7F) == 0x7F] = 0
    return b


def write_checkpoint(directory: Path, text_config: dict[str, Any], seed: int = 0) -> None:
    """A V4.1-format checkpoint in ``directory``, written chunk by chunk (module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = DeepSeekV41Config.from_json(text_config)
    D, M, E = config.hidden_size, config.hc_mult, config.head_dim
    n_cols = (config.max_ngram - 1) * config.n_heads
    weight_map = {}
    for i, (layer, rows) in enumerate(zip(config.layer_ids, config.num_embeddings, strict=True)):
        rng = np.random.default_rng([seed, layer])
        wkv = ((M + 1) * D, n_cols * E)
        wkv_blocks = tuple(-(-x // 32) for x in wkv)
        tensors = [  # name, dtype, shape, bytes of a chunk of rows
            ("embed.weight", "F8_E4M3", (rows, E), partial(_fp8_bytes, rng)),
            ("embed.scale", "F8_E8M0", (rows, E // 32), partial(_exponents, rng, 118, 122)),
            ("wkv.weight", "F8_E4M3", wkv, partial(_fp8_bytes, rng)),
            ("wkv.scale", "F8_E8M0", wkv_blocks, partial(_exponents, rng, 112, 116)),
            ("q_weight", "BF16", (M, D), partial(_bf16_ones, rng)),
            ("k_weight", "BF16", (M, D), partial(_bf16_ones, rng)),
        ]  # fmt: skip
        header, offset = {}, 0
        for part, dtype, shape, _ in tensors:
            nbytes = int(np.prod(shape)) * (2 if dtype == "BF16" else 1)
            header[f"layers.{layer}.engram.{part}"] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        shard = f"model-{i + 1:05d}-of-{len(config.layer_ids):05d}.safetensors"
        tmp = directory / (shard + ".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for _, _, shape, make in tensors:
                for start in range(0, shape[0], CHUNK_ROWS):
                    stop = min(start + CHUNK_ROWS, shape[0])
                    f.write(make((stop - start, *shape[1:])).tobytes())
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(directory / shard)
        weight_map.update(dict.fromkeys(header, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"text_config": text_config}, indent=1))


def _exponents(rng: np.random.Generator, lo: int, hi: int, shape: tuple[int, ...]) -> np.ndarray:
    """E8M0 scale bytes in [lo, hi): powers of two 2^(lo-127) .. 2^(hi-128)."""
    return rng.integers(lo, hi, size=shape, dtype=np.uint8)


def _bf16_ones(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    w = torch.from_numpy(1 + 0.25 * rng.standard_normal(shape).astype(np.float32))
    return w.to(torch.bfloat16).view(torch.int16).numpy()


def zipf_ids(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Compressed ids with Zipfian frequencies over V4.1's compressed vocabulary."""
    ids = rng.zipf(1.2, size=shape) - 1
    return torch.from_numpy(np.minimum(ids, COMPRESSED_VOCAB - 1).astype(np.int64))


def run_tokens(
    modules: dict[int, DeepSeekV41Engram], chunk: torch.Tensor, hidden: int, g: torch.Generator
) -> torch.Tensor:
    """One forward of [B, T] compressed ids through every Engram layer in order (each one's
    output streams are the next one's input), all layers' rows prefetched first, as a model
    does before its first layer; -> the last layer's output streams."""
    for module in modules.values():
        module.prefetch(chunk)
    h = torch.randn(chunk.shape[0], chunk.shape[1], 4, hidden, generator=g).to(torch.bfloat16)
    for module in modules.values():
        h = module(h, chunk)
    return h


def decode(
    modules: dict[int, DeepSeekV41Engram], ids: torch.Tensor, hidden: int, g: torch.Generator
) -> list[float]:
    """Decode ``ids`` [B, S] one position per step after whatever came before; -> seconds per
    step."""
    times = []
    for t in range(ids.shape[1]):
        start = time.perf_counter()
        run_tokens(modules, ids[:, t : t + 1], hidden, g)
        times.append(time.perf_counter() - start)
    return times


def table_stats(modules: dict[int, DeepSeekV41Engram]) -> dict[str, float]:
    """Row-cache hits and misses (file reads) summed over the disk tables."""
    total = {"hits": 0.0, "misses": 0.0}
    for module in modules.values():
        stats = module.engram.table.weight_store.stats()
        for key in total:
            total[key] += stats[key]
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/var/tmp/engram-v41", help="where checkpoint and tables go")
    p.add_argument("--table-gb", type=float, default=28.0, help="fp8 rows + scales, all layers")
    p.add_argument("--hidden", type=int, default=1024, help="residual width D (V4.1: 5120)")
    p.add_argument("--cache-mb", type=int, default=1024, help="row cache per table")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument(
        "--layers",
        default="1,14",
        help="Engram layers (V4.1: 1,14); one layer puts all of --table-gb in a single table",
    )
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    root = Path(args.dir)
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty; pass an empty or new --dir")
    ckpt, tables = root / "checkpoint", root / "tables"
    try:
        layers = tuple(int(x) for x in args.layers.split(","))
        text_config = v41_text_config(args.table_gb, args.hidden, layers)
        config = DeepSeekV41Config.from_json(text_config)
        sizes = table_bytes(config)
        print(
            f"tables: {', '.join(f'layer {k}: {v / 1e9:.2f} GB' for k, v in sizes.items())} "
            f"(fp8 + E8M0 scales, {sum(config.num_embeddings):,} rows of 256); RAM "
            f"{status_kb('MemTotal') / 1e6:.1f} GB"
        )
        t0 = time.perf_counter()
        write_checkpoint(ckpt, text_config)
        t1 = time.perf_counter()
        modules = load_engram(ckpt, tables="disk", table_dir=tables, cache_mb=args.cache_mb)
        t2 = time.perf_counter()
        print(
            f"checkpoint written in {t1 - t0:.0f}s, streamed into the disk tier in {t2 - t1:.0f}s"
        )
        shutil.rmtree(ckpt)
        drop_page_cache(tables)
        rss_loaded = status_kb("VmRSS")
        rng = np.random.default_rng(0)
        ids = zipf_ids(rng, (args.batch, args.prefill + args.steps))
        g = torch.Generator().manual_seed(0)
        run_tokens(modules, ids[:, : args.prefill], args.hidden, g)
        before = table_stats(modules)
        times = decode(modules, ids[:, args.prefill :], args.hidden, g)
        after = table_stats(modules)
        misses = after["misses"] - before["misses"]
        hits = after["hits"] - before["hits"]
        median, p90 = statistics.median(times) * 1e3, float(np.percentile(times, 90)) * 1e3
        print(
            f"decode: {args.steps} steps of {args.batch} tokens after a {args.prefill}-token "
            f"prefill: median {median:.1f} ms/step (p90 {p90:.1f} ms)"
        )
        print(
            f"per decode step: {args.batch * 24 * len(modules)} row lookups, "
            f"{misses / args.steps:.0f} rows read from the files, row-cache hit rate "
            f"{hits / max(1, hits + misses):.1%}"
        )
        peak, ram = status_kb("VmHWM") / 1e6, status_kb("MemTotal") / 1e6
        print(
            f"RSS after load {rss_loaded / 1e6:.2f} GB, peak RSS {peak:.2f} GB; tables on disk "
            f"{sum(sizes.values()) / 1e9:.1f} GB; RAM {ram:.1f} GB"
        )
        if args.keep:  # records each file's checksum: one read of the tables
            for module in modules.values():
                module.engram.table.close()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
