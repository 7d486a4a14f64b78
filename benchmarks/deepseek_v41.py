"""DeepSeek-V4.1's fp8 Engram tables: a decode step with the tables on disk vs in memory.

One V4.1-format checkpoint (``recipes/deepseek_v41_disk.py``'s writer: fp8 tables of 256-wide
rows with E8M0 scales, 24 hash columns, layers 1 and 14, hidden width ``--hidden``) is loaded
twice in one process with ``load_engram``: ``tables="host"`` (rows in memory) and
``tables="disk"`` (rows in a file behind a ``--cache-mb`` row cache, the file's pages dropped
from the page cache after loading). Both decode the same Zipfian compressed ids after the same
prefill, steps interleaved (memory, disk, disk, memory, ...) so load on the machine hits both
alike; each step prefetches its rows first. Prints the median step times and their ratio
(memory / disk: 1.0 means disk costs nothing), table rows read from the file per step, the row
cache's hit rate, and resident memory after each load and at the peak.

``--backbone-layers L`` (default 0: the Engram layers alone) puts the two Engram layers in a
decode step of an L-layer model, at the entry of layers 1 and 14 as in V4.1, both sides sharing
one stand-in backbone: each layer has a Llama-style layer's compute at width ``--hidden``
(attention over its KV cache, 8 heads; a SwiGLU MLP of width 2.75 x hidden; fp32 weights) on
the mean of the four streams, its output added to every stream. It stands in for V4.1's
layers' cost, not their function; V4.1's own layers are wider (5120) and MoE. The rows of both
Engram layers are prefetched when the step's token is known (before layer 0), so the reads
overlap the layers before each Engram layer, as in a model.

    .venv/bin/python benchmarks/deepseek_v41.py [--table-gb 2] [--cache-mb 64] [--dir /var/tmp/..]
        [--backbone-layers 16]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "recipes"))
from common import machine  # noqa: E402
from deepseek_v41_disk import (  # noqa: E402
    run_tokens,
    status_kb,
    table_stats,
    v41_text_config,
    write_checkpoint,
    zipf_ids,
)

from engramlm.deepseek_v41 import load_engram  # noqa: E402
from engramlm.tables.disk import drop_page_cache  # noqa: E402


class StandInLayer(nn.Module):
    """A decoder layer's compute on [B, T, hc, D] streams (see the module docstring)."""

    def __init__(self, hidden: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        inter = int(2.75 * hidden)
        self.attn_norm, self.mlp_norm = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, streams: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        B, T, _, D = streams.shape
        x = streams.float().mean(2)  # [B, T, D]
        qkv = self.qkv(self.attn_norm(x)).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, D / heads]
        if cache:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        causal = not cache  # a prefill from position 0; one new position attends to all
        cache[:] = [k, v]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1)
        y = x + self.out(a.transpose(1, 2).reshape(B, T, D))
        gate, up = self.up(self.mlp_norm(y)).chunk(2, -1)
        y = y + self.down(F.silu(gate) * up)
        return (streams.float() + (y - x).unsqueeze(2)).to(streams.dtype)


def model_tokens(
    modules: dict[int, torch.nn.Module],
    layers: nn.ModuleList,
    caches: list[list[torch.Tensor]],
    chunk: torch.Tensor,
    hidden: int,
    g: torch.Generator,
) -> torch.Tensor:
    """One forward of [B, T] ids through ``layers`` with the Engram modules at the entry of
    their layers; every Engram layer's rows prefetched first (the token is known); -> the last
    layer's output streams."""
    for module in modules.values():
        module.prefetch(chunk)
    h = torch.randn(chunk.shape[0], chunk.shape[1], 4, hidden, generator=g).to(torch.bfloat16)
    for i, layer in enumerate(layers):
        if i in modules:
            h = modules[i](h, chunk)
        h = layer(h, caches[i])
    return h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/var/tmp/engram-v41-bench")
    p.add_argument("--table-gb", type=float, default=2.0, help="fp8 rows + scales, both layers")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--cache-mb", type=int, default=64, help="disk tier's row cache per table")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument(
        "--backbone-layers", type=int, default=0, help="0: the Engram layers alone; else >= 15"
    )
    args = p.parse_args()
    if args.backbone_layers and args.backbone_layers < 15:
        p.error("--backbone-layers must be 0 or >= 15 (Engram sits at layers 1 and 14)")
    print(machine())
    root = Path(args.dir)
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty; pass an empty or new --dir")
    try:
        write_checkpoint(root / "checkpoint", v41_text_config(args.table_gb, args.hidden, (1, 14)))
        rss0 = status_kb("VmRSS")
        memory = load_engram(root / "checkpoint", tables="host")
        rss1 = status_kb("VmRSS")
        disk = load_engram(
            root / "checkpoint", tables="disk", table_dir=root / "tables", cache_mb=args.cache_mb
        )
        rss2 = status_kb("VmRSS")
        drop_page_cache(root / "tables")
        ids = zipf_ids(np.random.default_rng(0), (args.batch, args.prefill + args.steps))
        gens = {
            "memory": torch.Generator().manual_seed(0),
            "disk": torch.Generator().manual_seed(0),
        }
        torch.manual_seed(0)
        backbone = nn.ModuleList(StandInLayer(args.hidden) for _ in range(args.backbone_layers))
        caches: dict[str, list[list[torch.Tensor]]] = {
            name: [[] for _ in backbone] for name in gens
        }

        @torch.inference_mode()
        def step(name: str, chunk: torch.Tensor) -> torch.Tensor:
            modules = {"memory": memory, "disk": disk}[name]
            if args.backbone_layers:
                return model_tokens(modules, backbone, caches[name], chunk, args.hidden, gens[name])
            return run_tokens(modules, chunk, args.hidden, gens[name])

        for name in gens:
            step(name, ids[:, : args.prefill])
        before = table_stats(disk)
        times: dict[str, list[float]] = {"memory": [], "disk": []}
        differ = 0  # steps whose outputs are not bitwise equal between the sides
        for t in range(args.prefill, args.prefill + args.steps):
            order = ("memory", "disk") if t % 2 == 0 else ("disk", "memory")
            out = {}
            for name in order:
                start = time.perf_counter()
                out[name] = step(name, ids[:, t : t + 1])
                times[name].append(time.perf_counter() - start)
            differ += not torch.equal(out["memory"], out["disk"])
        after = table_stats(disk)
        mem_ms = statistics.median(times["memory"]) * 1e3
        disk_ms = statistics.median(times["disk"]) * 1e3
        misses, hits = after["misses"] - before["misses"], after["hits"] - before["hits"]
        where = (
            f"in a {args.backbone_layers}-layer stand-in model"
            if args.backbone_layers
            else "the Engram layers alone"
        )
        print(
            f"{where}: tables {args.table_gb:.1f} GB (both layers), hidden {args.hidden}, batch "
            f"{args.batch}, {args.steps} decode steps after a {args.prefill}-token prefill, "
            f"disk cache {args.cache_mb} MB per table"
        )
        print(
            f"decode step: memory {mem_ms:.2f} ms, disk {disk_ms:.2f} ms (medians); "
            f"memory/disk = {mem_ms / disk_ms:.2f}x; outputs bitwise equal in "
            f"{args.steps - differ} of {args.steps} steps"
        )
        print(
            f"disk: {misses / args.steps:.1f} rows read from the files per step of "
            f"{args.batch * 24 * len(disk)} lookups, row-cache hit rate "
            f"{hits / max(1, hits + misses):.1%}"
        )
        peak = status_kb("VmHWM") / 1e6
        print(
            f"RSS: +{(rss1 - rss0) / 1e6:.2f} GB for the in-memory tables, "
            f"+{(rss2 - rss1) / 1e6:.2f} GB for the disk ones; peak {peak:.2f} GB"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
