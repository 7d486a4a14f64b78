"""Does serving Qwen4-Exp's n-gram tables from engramlm's disk tier cost memory or speed?

A random Qwen4-Exp model (transformers' own classes) whose PLE n-gram tables total >= 4 GB is
saved once; then, side by side:

- peak RSS (VmHWM): one subprocess per side loads the model and runs the same prefill + decode -
  ``transformers``: ``AutoModelForCausalLM.from_pretrained`` (tables in RAM, as transformers
  keeps them); ``engramlm-disk``: ``engramlm.hf.load_offloaded(engram_tables="disk")`` on a
  tier built beforehand (its build is a third subprocess, reported on its own);
- tokens/s: one process holds both models; prefill of a ``--prompt``-token prompt and
  ``--decode`` cached decoding steps, calls interleaved, medians of ``--repeats``.

    .venv/bin/python benchmarks/qwen4_exp_offload.py [--dir /tmp/engramlm-qwen4] [--base 2000000]

The model folder and tier (~8.5 GB together at the default size) stay under ``--dir`` for
reruns; delete it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, machine  # noqa: E402

from engramlm.tables.disk import drop_page_cache  # noqa: E402

GB = 1e9
EOS = 0


def model_config(base: int):
    from transformers import Qwen4ExpTextConfig

    return Qwen4ExpTextConfig(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=256,
        num_experts=8,
        num_experts_per_tok=2,
        hc_count=4,
        hc_lowrank=32,
        ple_layer_ids=[1, 3],
        ngram_size=3,
        heads_per_ngram=8,
        ple_embed_dim=256,  # 16 heads of 16 dims
        ngram_vocab_size_base=base,
        split_ngram_parts=16,
        eos_token_id=EOS,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=64,
        indexer_budget=64,
        indexer_compress_ratio=4,
    )


def make(folder: Path, base: int) -> None:
    from transformers import Qwen4ExpForCausalLM

    torch.manual_seed(0)
    model = Qwen4ExpForCausalLM(model_config(base)).eval()
    with torch.no_grad():  # a trained-looking PLE: nonzero conv and norms
        for module in model.modules():
            if type(module).__name__ == "Qwen4ExpTextPLELayer":
                module.conv1d.weight.normal_(0, 0.3)
                for norm in (module.norm_key, module.norm_query, module.norm_conv):
                    norm.weight.normal_(0, 0.3)
    model.save_pretrained(folder, max_shard_size="1GB")


def table_bytes(folder: Path) -> tuple[int, int]:
    """(n-gram table bytes, all other weight bytes) of a saved folder, from its headers."""
    from engramlm.table_io import checkpoint_tensors

    dtype_bytes = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}
    tables = other = 0
    for key, (_, shape, dtype) in checkpoint_tensors(folder).items():
        n = dtype_bytes.get(dtype, 4)
        for s in shape:
            n *= s
        if "ngram_embedding" in key:
            tables += n
        else:
            other += n
    return tables, other


def load(side: str, folder: Path, tier: Path):
    if side == "transformers":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder).eval()
    from engramlm.hf import load_offloaded

    return load_offloaded(folder, engram_tables="disk", table_dir=tier)


def prompt(length: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 4096, (batch, length), generator=g)
    ids[:, length // 3] = EOS
    return ids


@torch.no_grad()
def prefill_then_decode(model, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill seconds, seconds of ``steps`` greedy cached decoding steps)."""
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    t1 = time.perf_counter()
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return t1 - t0, time.perf_counter() - t1


def side_main(args: argparse.Namespace) -> None:
    """One side in its own process: load, prefill + decode once, report its memory."""
    t0 = time.perf_counter()
    seconds = None
    if args.side == "make":
        make(args.folder, args.base)
    elif args.side == "imports":  # the runtime alone: python, torch, transformers, engramlm
        import transformers  # noqa: F401

        import engramlm.hf  # noqa: F401
    elif args.side == "build":
        from engramlm.hf import close_tables

        close_tables(load("engramlm-disk", args.folder, args.tier))
    else:
        if args.side == "engramlm-disk-cold":
            drop_page_cache(args.tier)
        elif args.side == "engramlm-disk":
            fill_page_cache(args.tier)
        model = load(args.side, args.folder, args.tier)
        seconds = time.perf_counter() - t0  # the load alone (and the page-cache fill)
        prefill_then_decode(model, prompt(args.prompt), args.decode)
    seconds = time.perf_counter() - t0 if seconds is None else seconds
    print(json.dumps({"side": args.side, **memory(), "seconds": seconds}))


def memory() -> dict[str, int]:
    """This process's peak resident set (VmHWM: it starts afresh at exec, unlike ``ru_maxrss``,
    which a child inherits from the parent it was forked from) and its resident anonymous and
    file-backed memory now (bytes)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name = line.split(":")[0]
        if name in ("VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(line.split()[1]) << 10
    return fields


def fill_page_cache(tier: Path) -> None:
    """Read the tier files once, so their pages are in the page cache (as right after a
    build): the hot start."""
    for path in tier.rglob("*.engt"):
        with open(path, "rb") as f:
            while f.read(1 << 20):  # small reads: the buffer is heap (counted in RSS)
                pass


def run_side(side: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--dir", str(args.dir)]
    cmd += ["--prompt", str(args.prompt), "--decode", str(args.decode), "--base", str(args.base)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/engramlm-qwen4"))
    p.add_argument("--base", type=int, default=2_000_000, help="ngram_vocab_size_base")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--decode", type=int, default=32, help="cached decoding steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--side", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.folder, args.tier = args.dir / "model", args.dir / "tier"
    if args.side:
        return side_main(args)

    print(machine())
    if not (args.folder / "config.json").is_file():  # in a child: the parent stays small
        print(f"saved the model in {run_side('make', args)['seconds']:.0f} s")
    tables, other = table_bytes(args.folder)
    print(f"n-gram tables {tables / GB:.2f} GB, other weights {other / GB:.3f} GB")
    if not args.tier.exists():
        build = run_side("build", args)
        print(f"disk tier built in {build['seconds']:.0f} s, peak RSS {build['VmHWM'] / GB:.2f} GB")
    else:
        print(f"disk tier {args.tier} reused")

    sides = ("imports", "transformers", "engramlm-disk", "engramlm-disk-cold")
    mem = {side: run_side(side, args) for side in sides}
    print("side: peak RSS (VmHWM); at the end: resident anonymous / file-backed; load seconds")
    for side, m in mem.items():
        print(
            f"{side:>18}: {m['VmHWM'] / GB:.2f} GB; {m['RssAnon'] / GB:.2f} / "
            f"{m['RssFile'] / GB:.2f} GB; {m['seconds']:.1f} s"
        )
    base = mem["imports"]["VmHWM"] + other
    for side in sides[1:]:
        over = (mem[side]["VmHWM"] - base) / GB
        print(f"{side:>18}: peak RSS - runtime - other weights = {over:.2f} GB (goal <= 0.5)")

    models = {
        side: load(side, args.folder, args.tier) for side in ("transformers", "engramlm-disk")
    }
    ids = prompt(args.prompt)
    results: dict[str, list[tuple[float, float]]] = {side: [] for side in models}

    def run(side: str) -> None:
        results[side].append(prefill_then_decode(models[side], ids, args.decode))

    interleaved({side: lambda side=side: run(side) for side in models}, repeats=args.repeats)
    med = {}
    for side, times in results.items():
        timed = times[1:]  # the first call is interleaved()'s warm-up
        med[side] = tuple(statistics.median(t[i] for t in timed) for i in (0, 1))
        rates = f"prefill {args.prompt / med[side][0]:8.1f} tok/s"
        print(f"{side:>18}: {rates}, decode {args.decode / med[side][1]:6.1f} tok/s")
    t, e = med["transformers"], med["engramlm-disk"]
    print(f"engramlm-disk / transformers: prefill {t[0] / e[0]:.2f}x, decode {t[1] / e[1]:.2f}x")


if __name__ == "__main__":
    main()
