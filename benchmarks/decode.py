"""How fast is KV-cached decoding with Engram, and with its table on disk?

Three models with the same backbone and weights (4 layers, D=256 by default): no Engram;
Engram at layer 1 with the table in memory; the same table on the disk tier (DiskStore with a
hot-row cache, rows prefetched before layer 0). Each decodes the same prompts greedily with the
KV cache; the runs are interleaved, and tokens/s are medians over repeats. ``--compile`` adds
``torch.compile(model, dynamic=True)`` of the backbone and of the in-memory Engram model
(compiled before timing; the ratio that matters there is compiled Engram / compiled backbone);
``--no-disk`` leaves the disk tier out. ``--breakdown`` adds the Engram model with its Engram
layers' work replaced by zeros (hashing, the prefetch and the cache's n-gram state stay): the
gap between it and the backbone is what Engram costs outside its layer, the rest is the layer.
``--count-ops`` first prints the aten operators one decode step dispatches, backbone and
Engram (a count, not a timing: at B=1 a step's time is mostly per-operation dispatch cost).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode.py [--batch 1] [--layers 4]
        [--hidden 256] [--new 64] [--table-size 200000] [--compile] [--no-disk] [--breakdown]
        [--count-ops]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, machine, top_level_ops  # noqa: E402

from engramlm.config import EngramConfig, ModelConfig  # noqa: E402
from engramlm.generate import generate_tokens  # noqa: E402
from engramlm.model import EngramLM  # noqa: E402
from engramlm.tables import TablePlan, convert_table  # noqa: E402
from engramlm.tables.disk import drop_page_cache  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--table-size", type=int, default=200_000, help="rows per head, pre-prime")
    p.add_argument("--cache-mb", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--no-disk", action="store_true", help="leave the disk tier out")
    p.add_argument("--breakdown", action="store_true", help="also time the Engram layer skipped")
    p.add_argument(
        "--count-ops", action="store_true", help="print the operators of one decode step"
    )
    args = p.parse_args()

    D = args.hidden
    backbone = ModelConfig(
        vocab_size=8192,
        num_layers=args.layers,
        hidden_size=D,
        num_heads=max(1, D // 64),
        num_kv_heads=max(1, D // 64),
        ffn_hidden_size=3 * D,
        max_seq_len=args.prompt + args.new,
    )
    engram_cfg = EngramConfig(
        table_sizes=(args.table_size, args.table_size),
        embed_dim_per_ngram=128,
        layer_ids=(1,),
        hc_mult=1,
        pad_id=0,
    )
    with_engram = dataclasses.replace(backbone, engram=engram_cfg)
    torch.manual_seed(0)
    base = EngramLM(backbone).eval()
    mem = EngramLM(with_engram).eval()
    mem.load_state_dict(base.state_dict(), strict=False)  # same backbone weights
    with tempfile.TemporaryDirectory() as tmp:
        disk = EngramLM(
            with_engram, tables=TablePlan(kind="disk", path=tmp, cache_mb=args.cache_mb)
        ).eval()
        disk.load_state_dict(
            {k: v for k, v in mem.state_dict().items() if "table" not in k}, strict=False
        )
        for src, dst in zip(mem.engram_tables(), disk.engram_tables(), strict=True):
            convert_table(src, dst)
        drop_page_cache(Path(tmp))  # the first decode reads its rows from the disk
        prompt = torch.randint(0, backbone.vocab_size, (args.batch, args.prompt))

        def decode(model: EngramLM) -> torch.Tensor:
            return torch.stack(list(generate_tokens(model, prompt, args.new, temperature=0)), 1)

        out_mem = decode(mem)
        variants = {"backbone": lambda: decode(base), "engram (memory)": lambda: decode(mem)}
        if not args.no_disk:
            assert torch.equal(out_mem, decode(disk)), "disk-tier decoding differs from in-memory"
            variants["engram (disk)"] = lambda: decode(disk)
        if args.breakdown:
            skipped = EngramLM(with_engram).eval()
            skipped.load_state_dict(mem.state_dict())
            skip_engram_layers(skipped)
            variants["engram (layer skipped)"] = lambda: decode(skipped)
        if args.count_ops:
            counted = {"backbone": base, "engram (memory)": mem}
            if args.breakdown:
                counted["engram (layer skipped)"] = skipped
            print_step_ops(counted, prompt)
        if args.compile:
            base_c = torch.compile(base, dynamic=True)
            mem_c = torch.compile(mem, dynamic=True)
            decode(base_c)  # compiles: not timed
            assert torch.equal(decode(mem_c), out_mem), "compiled decoding differs from eager"
            variants["backbone (compiled)"] = lambda: decode(base_c)
            variants["engram (compiled)"] = lambda: decode(mem_c)
        load = os.getloadavg()[0]
        before = disk_stats(disk)
        t = interleaved(variants, repeats=args.repeats)
        after = disk_stats(disk)
        rows = sum(t_.num_rows for t_ in mem.engram_tables())
        print(f"machine: {machine()}; load average {load:.1f} at start")
        print(
            f"greedy decode, B={args.batch}, prompt {args.prompt} + {args.new} new tokens, "
            f"D={D}, {args.layers} layers; Engram layer 1, {rows:,} rows "
            f"({rows * engram_cfg.head_dim * 4 / 1e6:.0f} MB), disk cache {args.cache_mb} MB"
        )
        tokens = args.batch * args.new
        for name, sec in t.items():
            reference = t["backbone (compiled)" if "compiled" in name else "backbone"]
            print(f"  {name:20s} {tokens / sec:8.1f} tok/s   {reference / sec:5.3f}x backbone")
        if not args.no_disk:
            mem_sec, disk_sec = t["engram (memory)"], t["engram (disk)"]
            hits, misses = (after[k] - before[k] for k in ("hits", "misses"))
            row_bytes = engram_cfg.head_dim * 4
            print(
                f"  disk / memory: {mem_sec / disk_sec:.3f}x; while timed, the disk table's row "
                f"cache hit {hits / max(1, hits + misses):.1%} of {hits + misses:,.0f} row reads "
                f"and read {misses * row_bytes / 1e6:.2f} MB of rows from the file "
                f"(before: {before['misses']:,.0f} rows read by the untimed first decode)"
            )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


def print_step_ops(models: dict[str, EngramLM], prompt: torch.Tensor) -> None:
    """The aten operators of one KV-cached decode step (after the prompt and two steps) of each
    model, and what the others add to the first's."""
    counts = {}
    for name, model in models.items():
        with torch.inference_mode():
            cache = model.new_cache()
            model(prompt, cache=cache)
            token = prompt[:, -1:]
            for _ in range(2):
                model(token, cache=cache)
            step = functools.partial(model, token, cache=cache)
            counts[name] = top_level_ops(step)
    first, *others = counts
    for name in others:
        added = counts[name] - counts[first]
        top = ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in added.most_common(12))
        net = counts[name].total() - counts[first].total()
        print(
            f"operators per decode step: {first} {counts[first].total()}, {name} "
            f"{counts[name].total()} ({net:+d}; most added: {top})"
        )


def skip_engram_layers(model: EngramLM) -> None:
    """Each Engram layer returns zeros (and a zero conv state) instead of its output: the model
    still hashes, prefetches and keeps its n-gram state, but does none of the layer's work."""
    for block in model.layers:
        if block.engram is None:
            continue
        conv = block.engram.short_conv
        past = 0 if conv is None else conv.receptive_field

        def skipped(hidden: torch.Tensor, *_: object, past: int = past, **__: object) -> tuple:
            B, _T, M, D = hidden.shape
            return torch.zeros_like(hidden), hidden.new_zeros(B, M * D, past)

        block.engram.forward = skipped  # type: ignore[method-assign]
        block.engram.fused_call = lambda: None  # type: ignore[method-assign]  # not the kernel


def disk_stats(model: EngramLM) -> dict[str, float]:
    """Row-cache hits and misses summed over the model's disk tables' weight stores."""
    total = {"hits": 0.0, "misses": 0.0}
    for table in model.engram_tables():
        stats = table.weight_store.stats()
        for key in total:
            total[key] += stats[key]
    return total


if __name__ == "__main__":
    main()
