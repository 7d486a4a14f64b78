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

    .venv/bin/python benchmarks/deepseek_v41.py [--table-gb 2] [--cache-mb 64] [--dir /var/tmp/..]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/var/tmp/engram-v41-bench")
    p.add_argument("--table-gb", type=float, default=2.0, help="fp8 rows + scales, both layers")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--cache-mb", type=int, default=64, help="disk tier's row cache per table")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
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
        sides = {"memory": memory, "disk": disk}
        for name, modules in sides.items():
            run_tokens(modules, ids[:, : args.prefill], args.hidden, gens[name])
        before = table_stats(disk)
        times: dict[str, list[float]] = {"memory": [], "disk": []}
        for t in range(args.prefill, args.prefill + args.steps):
            order = ("memory", "disk") if t % 2 == 0 else ("disk", "memory")
            for name in order:
                start = time.perf_counter()
                run_tokens(sides[name], ids[:, t : t + 1], args.hidden, gens[name])
                times[name].append(time.perf_counter() - start)
        after = table_stats(disk)
        mem_ms = statistics.median(times["memory"]) * 1e3
        disk_ms = statistics.median(times["disk"]) * 1e3
        misses, hits = after["misses"] - before["misses"], after["hits"] - before["hits"]
        print(
            f"tables {args.table_gb:.1f} GB (both layers), hidden {args.hidden}, batch "
            f"{args.batch}, {args.steps} decode steps after a {args.prefill}-token prefill, "
            f"disk cache {args.cache_mb} MB per table"
        )
        print(
            f"decode step: memory {mem_ms:.2f} ms, disk {disk_ms:.2f} ms (medians); "
            f"memory/disk = {mem_ms / disk_ms:.2f}x"
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
