"""Find a miniature setting where the MoE earns its parameters (issue 12, item 7).

In ``make demo`` the MoE is barely better than the dense model with a quarter of its
parameters (routing still unbalanced after 300 steps), so "Engram beats the iso-parameter MoE"
partly measures idle experts. This trains the MoE and its iso-FLOP dense model (same
activated FFN width, ``compare.dense_iso_flop``) for a few candidate settings, at several
seeds, and reports the margin dense - MoE with its seed spread and the routing balance
(busiest expert / mean, last step). A setting is *clear* when the mean margin exceeds both
0.02 nats and twice the seeds' standard deviation of the margin. Two diagnostics:
``--ceiling [SEEDS]`` also trains the dense model with every expert's parameters in each FFN
(what the parameters buy without routing), and ``--probe-routing`` scores each trained MoE with
random and with no routed experts (whether its experts are idle or specialised).

``--sweep`` then runs the allocation experiment (``engramlm experiment allocation``, same
seeds) at the first clear setting, or ``--sweep-at NAME`` at a named one, with its results in
``runs/moe_baseline_sweep/allocation/`` (not the main experiment's folder or page), and writes
``docs/moe_baseline.md``: the search's table and the sweep's section. ``--sweep-points
RHO:SEED,...`` (with ``--sweep-at``) trains only those points of the sweep, in that order, and
stops: two such processes with disjoint points use both cores (a second plain ``--sweep`` would
only wait on the first's lock); a later ``--sweep-at`` reads them back instead of retraining.

Runs are stored like the experiments' (``runs/_models/<digest>``, shared and resumable), so an
interrupted search resumes and the allocation sweep reuses the rho = 1 MoE. Each finished run's
result is also kept in ``docs/records/<digest>.json`` (``--records``), which is committed: a new
clone has no ``runs/`` folder, and a run with a record is read from it, not retrained, so
seeds trained in different sessions (or on different machines: the record names it) add up.
The page keeps its rows of earlier searches that a call does not redo at the same seeds or more
(rows written before the records began have no runs left to recompute them from).
Budget: each model of the demo's size takes ~3.3 min per 300 steps on 2 idle CPU cores; a
`small-kernel` model ~17-20 min on one core (its ceiling ~31 min).

    .venv/bin/python recipes/moe_baseline.py [--seeds 0,1,2] [--candidates demo,long] [--smoke]
        [--sweep | --sweep-at NAME] [--page docs/moe_baseline.md] [--dense-first]
        [--records docs/records] [--ceiling [SEEDS]] [--probe-routing]
        [--sweep-points RHO:SEED,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engramlm.compare import dense_iso_flop, dense_iso_param
from engramlm.experiments import allocation
from engramlm.experiments.common import Context, machine
from engramlm.experiments.pair import batches, heldout_windows
from engramlm.model import EngramLM, MoE, allocate

LONG = {"steps": 1200, "warmup_steps": 120, "eval_every": 400}
# 16x the demo's steps: at 1,200 the MoE led the dense model at both seeds, by +0.011 on average
# (+0.017 / +0.005), after trailing it at 300; the next length to try.
LONGER = {"steps": 4800, "warmup_steps": 480, "eval_every": 1200}
NARROW = {"num_experts": 32, "expert_hidden_size": 64, "ffn_hidden_size": 192}
# Half the width (activated FFN 384): about twice the steps per second on one core, so twice
# `long`'s steps, each token a larger share of the model: the dense model's non-embedding
# weights see ~5.8 training tokens each (`long`: 0.7, `longer`: 2.9).
SMALL = {
    "hidden_size": 128,
    "num_heads": 2,
    "num_kv_heads": 2,
    "ffn_hidden_size": 384,
    "expert_hidden_size": 128,
}
# pydocs has 2.66M training tokens, so `longer` (9.8M) went over it 3.7 times; the kernel's
# documentation (DATA.md; 14.9M training tokens, 416 held-out documents) is seen once at most.
KERNEL = {"data": "kernel-docs", "steps": 2400, "warmup_steps": 240, "eval_every": 600}
# name: (MoE field changes, training changes)
CANDIDATES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "demo": ({}, {}),
    "long": ({}, LONG),  # 4x the steps: each expert sees 4x the tokens
    # Faster loss-free balancing: at gamma = 1e-3 the biases move at most 0.3 in 300 steps, and
    # the busiest expert still gets 4.7x the mean at the last step (demo, two seeds).
    "balanced": ({"moe_bias_update_rate": 1e-2}, {}),
    "long-balanced": ({"moe_bias_update_rate": 1e-2}, LONG),
    "longer": ({}, LONGER),
    "long-8x512": ({"num_experts": 8, "expert_hidden_size": 512}, LONG),  # fewer, wider experts
    # V3's routed scaling: the top-2 gate weights sum to 2, not 1, so the routed experts add up
    # like the dense model's FFN instead of averaging to one expert's output.
    "scaled": ({"moe_routed_scale": 2.0}, {}),
    # Narrow activated FFN (top-2 + 1 shared of width 64, as is the first layer's dense FFN) and
    # 32 routed experts: the iso-FLOP dense model (FFN 192) is capacity-starved sooner.
    "narrow": (NARROW, {}),
    "narrow-scaled": ({**NARROW, "moe_routed_scale": 2.0}, {}),
    "small-kernel": (SMALL, KERNEL),
    # At gamma 1e-3 small-kernel's routing collapsed at every seed (busiest expert 8x the
    # mean, one expert in every token's top-2, from step ~50 to ~400-500) and its margin varied
    # by seed (+0.001 / +0.102 / +0.028); at gamma 1e-2 the collapse is over by step ~100.
    "small-kernel-balanced": ({**SMALL, "moe_bias_update_rate": 1e-2}, KERNEL),
}
MIN_MARGIN = 0.02


def imbalance(expert_load: list[list[float]] | None) -> float:
    """Busiest expert's load over the mean, worst MoE layer (1.0 = balanced)."""
    if not expert_load:
        return float("nan")
    return max(max(layer) / statistics.fmean(layer) for layer in expert_load if layer)


# Points below the sweep's lowest rho, where the U's left arm would be (each moves a distinct
# whole number of the default 14 idle experts): ``--sweep-points`` trains them on request; the
# page lists those found finished, seed by seed, beside the sweep.
BEYOND_RHOS = (0.3, 0.2, 0.1, 0.0)

PROBE_WINDOWS = 160  # held-out windows of the routing probe (20k tokens at T = 128)


def routing_probe(model: EngramLM, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Held-out loss of a trained MoE as routed (``learned``), with every token sent to top-k
    experts drawn at random, gate weights 1/k (``random``), and with the routed experts'
    output removed, the shared expert kept (``none``). Experts that sit idle or do the same
    thing give ``random`` close to ``learned``; specialised ones, close to ``none``."""

    def loss() -> float:
        total = 0.0
        with torch.no_grad():
            for x, y in zip(batches(inputs), batches(targets), strict=True):
                total += float(model(x, targets=y).loss) * y.numel()
        return total / targets.numel()

    generator = torch.Generator().manual_seed(0)

    def random_route(moe: MoE, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        draw = torch.rand(flat.shape[0], moe.num_experts, generator=generator)
        experts = draw.argsort(dim=-1)[:, : moe.top_k]
        return experts, torch.full(experts.shape, 1.0 / moe.top_k)

    def no_route(moe: MoE, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        experts, weights = MoE.route(moe, flat)
        return experts, torch.zeros_like(weights)

    moes = list(model.moe_layers().values())
    result = {"learned": loss()}
    for name, route in (("random", random_route), ("none", no_route)):
        for moe in moes:  # an instance attribute shadows the method, for this probe only
            moe.route = route.__get__(moe)
        try:
            result[name] = loss()
        finally:
            for moe in moes:
                del moe.route
    return result


def probe(ctx: Context, key: str, cfg: Any) -> dict[str, float] | None:
    """:func:`routing_probe` of the trained MoE ``key``; None when only its record is here."""
    if not (ctx.out_dir / "models" / key / "config.json").exists():
        return None
    inputs, targets = heldout_windows(
        ctx.corpus_for(cfg), cfg.seq_len, 4 if ctx.smoke else PROBE_WINDOWS
    )
    return routing_probe(ctx.load(key), inputs, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--smoke", action="store_true", help="CI size: seconds, no findings")
    parser.add_argument(
        "--sweep", action="store_true", help="then the allocation sweep at the first clear one"
    )
    parser.add_argument("--sweep-at", default=None, help="the allocation sweep at this candidate")
    parser.add_argument("--page", default="docs/moe_baseline.md", help="written after a sweep")
    parser.add_argument(
        "--sweep-points",
        default=None,
        metavar="RHO:SEED,...",
        help="with --sweep-at: train only these points of the sweep, in this order, then stop "
        "(no page): a second process given other points trains beside the first",
    )
    parser.add_argument(
        "--dense-first",
        action="store_true",
        help="train each seed's dense model before its MoE: a second process started so "
        "trains the other model beside the first (the runs' lock stops a double training)",
    )
    parser.add_argument(
        "--ceiling",
        nargs="?",
        const="",
        default=None,
        metavar="SEEDS",
        help="also train, at these seeds (default: all), the dense model with all the experts' "
        "parameters in every FFN (compare.dense_iso_param): what they buy without routing",
    )
    parser.add_argument(
        "--probe-routing",
        action="store_true",
        help="score each MoE whose weights are in runs/ with random and with no routed experts "
        "(routing_probe): are its experts idle or specialised?",
    )
    parser.add_argument(
        "--records",
        default=None,
        help="folder of finished runs' results, by digest (default docs/records; none with "
        "--smoke unless given)",
    )
    args = parser.parse_args()
    records = args.records or (None if args.smoke else "docs/records")
    if args.sweep_at is not None and args.sweep_at not in args.candidates.split(","):
        parser.error(f"--sweep-at {args.sweep_at}: not among --candidates {args.candidates}")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    points = parse_points(parser, args.sweep_points, seeds, smoke=args.smoke)
    if points and args.sweep_at is None:
        parser.error("--sweep-points needs --sweep-at NAME (the candidate the sweep runs at)")
    ceiling_seeds = set(seeds) if args.ceiling == "" else set()
    if args.ceiling:
        ceiling_seeds = {int(s) for s in args.ceiling.split(",")}
        if not ceiling_seeds <= set(seeds):
            parser.error(f"--ceiling {args.ceiling}: not all among --seeds {args.seeds}")
    names = args.candidates.split(",")
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidates {unknown}; known: {sorted(CANDIDATES)}")
    ctx = Context(name="moe_baseline", seeds=seeds, smoke=args.smoke, records_root=records)
    rows = []
    for name in names:
        moe_changes, train_changes = CANDIDATES[name]
        if args.smoke:
            train_changes = {}
        # As the allocation experiment builds its rho = 1 model (same digest: the sweep reuses it)
        moe = dataclasses.replace(ctx.base_moe, **moe_changes)
        dense = dense_iso_flop(moe)
        margins, moe_losses, dense_losses, balance, ceilings = [], [], [], [], []
        probes: list[dict[str, float] | None] = []
        curves: list[dict[int, float]] = []  # per seed: evaluation step -> margin
        for seed in seeds:
            cfg = ctx.train_config(seed=seed, **train_changes)
            models = {"moe": moe, "dense": dense, "ceiling": dense_iso_param(moe)}
            order = ("dense", "moe") if args.dense_first else ("moe", "dense")
            order += ("ceiling",) if seed in ceiling_seeds else ()
            done = {k: ctx.train(f"{name}-{k}-seed{seed}", models[k], cfg) for k in order}
            m, d = done["moe"], done["dense"]
            moe_losses.append(m.val_loss)
            dense_losses.append(d.val_loss)
            margins.append(d.val_loss - m.val_loss)
            balance.append(imbalance(m.expert_load))
            ceilings.append(done["ceiling"].val_loss if seed in ceiling_seeds else None)
            if args.probe_routing:
                probes.append(probe(ctx, f"{name}-moe-seed{seed}", cfg))
            moe_curve, dense_curve = val_curve(m.history), val_curve(d.history)
            curves.append({s: dense_curve[s] - moe_curve[s] for s in moe_curve if s in dense_curve})
        spread = statistics.stdev(margins) if len(margins) > 1 else float("nan")
        mean = statistics.fmean(margins)
        clear = len(margins) > 1 and mean > max(MIN_MARGIN, 2 * spread)
        row = {
            "candidate": name,
            "seeds": list(seeds),
            "moe": moe_changes,
            "train": train_changes,
            "moe_val_loss": moe_losses,
            "dense_val_loss": dense_losses,
            "margin": margins,
            "margin_mean": mean,
            "margin_sd": spread,
            "imbalance": balance,
            "ceiling_val_loss": ceilings,  # per seed, None where --ceiling did not train it
            "routing_probe": probes,  # per seed, None where the MoE's weights are not in runs/
            "clear": clear,
            # Mean margin over the seeds at every evaluation (all on the same schedule): how
            # the margin grows with training, not only where it ends.
            "margin_by_step": {
                str(step): statistics.fmean(c[step] for c in curves)
                for step in sorted(set.intersection(*(set(c) for c in curves)))
            },
        }
        rows.append(row)
        print(
            f"{name}: MoE {statistics.fmean(moe_losses):.4f}, "
            f"dense {statistics.fmean(dense_losses):.4f}, margin {mean:+.4f} "
            f"(sd {spread:.4f}, seeds {list(seeds)}), busiest expert "
            f"{statistics.fmean(balance):.2f}x the mean: {'clear' if clear else 'not clear'}",
            flush=True,
        )
    # Candidates searched in earlier calls keep their rows (with their own seeds), unless this
    # call searched the same candidate at those seeds or more.
    path = ctx.out_dir / "results.json"
    earlier = json.loads(path.read_text())["rows"] if path.exists() and not args.smoke else []
    rows += [r for r in earlier if not superseded(r["candidate"], r["seeds"], rows)]
    path.write_text(json.dumps({"rows": rows}, indent=2))
    page = Path(args.page) if not args.smoke else ctx.out_dir / "moe_baseline.md"
    # The page's own rows of searches whose runs this clone does not have (runs/ is not in the
    # repository; records began later): kept as they were written.
    kept = [line for line in page_rows(page) if not superseded(*line_key(line), rows)]
    best = next((r for r in rows if r["clear"]), None)
    if best is None:
        print("no candidate gives the MoE a clear margin over the dense model")
    else:
        print(f"first clear setting: {best['candidate']}")
    at = next(r for r in rows if r["candidate"] == args.sweep_at) if args.sweep_at else best
    if not (args.sweep or args.sweep_at) or at is None:
        write_page(page, rows, machine=machine(), kept=kept)
        print(f"search table: {page}")
        return
    sweep = Context(
        name="allocation",
        out_root=ctx.out_root / "moe_baseline_sweep",
        seeds=seeds,
        smoke=args.smoke,
        settings={"moe": at["moe"], "train": {} if args.smoke else at["train"]},
        models_root=ctx.models_root,  # the search's MoE is the sweep's rho = 1
        records_root=records,
    )
    if points:
        for rho, seed in points:
            cfg = allocate(sweep.base_moe, rho, engram=sweep.base_engram)
            # The key allocation.run gives the point: it reads this run back, not retraining it.
            done = sweep.train(f"rho{rho:g}_seed{seed}", cfg, sweep.train_config(seed=seed))
            beyond = "" if rho in allocation.RHOS + allocation.SMOKE_RHOS else ", beyond the sweep"
            print(
                f"sweep point rho {rho:g} seed {seed} (achieved "
                f"{allocation.expert_share(cfg):.3f}, {cfg.num_experts} routed experts"
                f"{beyond}): {done.val_loss:.4f}",
                flush=True,
            )
        return
    flags = [f"--moe.{k}={v}" for k, v in at["moe"].items()]
    flags += [f"--train.{k}={v}" for k, v in at["train"].items()]
    sweep.save_results(allocation.run(sweep))
    doc = json.loads((sweep.out_dir / "results.json").read_text())
    doc["command"] = (
        f"python recipes/moe_baseline.py --seeds {args.seeds} --sweep-at {at['candidate']} "
        f"(= engramlm experiment allocation --seeds {args.seeds} {' '.join(flags)})"
    )
    beyond = beyond_points(sweep, seeds)
    write_page(
        page, rows, machine=doc["machine"], sweep=(at, doc, sweep.out_dir), kept=kept, beyond=beyond
    )
    print(f"allocation sweep at {at['candidate']}: {page}")


def beyond_points(sweep: Context, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """The points of :data:`BEYOND_RHOS` finished at one seed or more (trained by
    ``--sweep-points``, here or in a record): rho, achieved rho, experts, table rows per head
    and the loss per seed (None where not trained). Nothing is trained."""
    lowest = min(allocation.SMOKE_RHOS if sweep.smoke else allocation.RHOS)
    # Few experts (the smoke MoE's 6 idle) round neighbouring rhos to one model: list it once.
    seen = {allocate(sweep.base_moe, lowest, engram=sweep.base_engram).num_experts}
    found = []
    for rho in BEYOND_RHOS:
        cfg = allocate(sweep.base_moe, rho, engram=sweep.base_engram)
        if cfg.num_experts in seen:
            continue
        seen.add(cfg.num_experts)
        done = [sweep.finished(cfg, sweep.train_config(seed=seed)) for seed in seeds]
        if any(r is not None for r in done):
            assert cfg.engram is not None  # allocate moved experts: rho < the sweep's lowest
            found.append(
                {
                    "rho": rho,
                    "rho_achieved": allocation.expert_share(cfg),
                    "num_experts": cfg.num_experts,
                    "table_size": cfg.engram.table_sizes[0],
                    "val_loss": [None if r is None else r.val_loss for r in done],
                }
            )
    return found


def beyond_section(beyond: list[dict[str, Any]], doc: dict[str, Any]) -> list[str]:
    """The page's table of points below the sweep, each seed beside the sweep's rho = 1 at that
    seed (the sweep's MoE) and its lowest rho."""
    if not beyond:
        return []
    points = sorted(doc["results"]["points"], key=lambda p: p["rho"])
    low, pure = points[0], points[-1]
    seeds = doc["seeds"]
    lines = [
        "### Beyond the sweep's left end",
        "",
        f"Points below rho = {low['rho']:g}, trained one seed at a time with `--sweep-points "
        f"RHO:SEED --sweep-at NAME` (not in the verdict above, which covers the sweep's grid): "
        f"each seed's loss, then its difference from rho = {pure['rho']:g} and from rho = "
        f"{low['rho']:g} at the same seed. Seeds {seeds}; '-' where not trained.",
        "",
        "| rho (nominal) | rho (achieved) | routed experts | table rows per head | val loss "
        f"| vs rho = {pure['rho']:g} | vs rho = {low['rho']:g} |",
        "|---|---|---|---|---|---|---|",
    ]

    def per_seed(values: list[float | None], ref: list[float] | None = None) -> str:
        if ref is None:
            return " / ".join("-" if v is None else f"{v:.4f}" for v in values)
        return " / ".join(
            "-" if v is None else f"{v - r:+.4f}" for v, r in zip(values, ref, strict=True)
        )

    for b in beyond:
        lines.append(
            f"| {b['rho']:g} | {b['rho_achieved']:.3f} | {b['num_experts']} | {b['table_size']:,}"
            f" | {per_seed(b['val_loss'])} | {per_seed(b['val_loss'], pure['val_loss'])} | "
            f"{per_seed(b['val_loss'], low['val_loss'])} |"
        )
    every = [(p["rho"], p["val_loss"]) for p in [*points, *beyond]]
    lowest = []
    for i, seed in enumerate(seeds):
        trained = [(loss[i], rho) for rho, loss in every if loss[i] is not None]
        lowest.append(f"rho = {min(trained)[1]:g} at seed {seed}")
    lines += [
        "",
        f"Lowest loss over the sweep and these points: {', '.join(lowest)}. A minimum above "
        "the lowest rho trained, at every seed, is a U with both arms; one at the lowest rho "
        "trained is one arm.",
    ]
    return [*lines, ""]


def parse_points(
    parser: argparse.ArgumentParser, text: str | None, seeds: tuple[int, ...], *, smoke: bool
) -> list[tuple[float, int]]:
    """``"0.8:0,0.4:1"`` -> ``[(0.8, 0), (0.4, 1)]``, each seed one of ``--seeds`` and each rho
    one of the sweep's or of :data:`BEYOND_RHOS` (below its lowest, where the U's left arm would
    be: the page lists them apart from the sweep's table). Any other point would train a run
    nothing reads, so it is refused."""
    if not text:
        return []
    rhos = allocation.SMOKE_RHOS if smoke else allocation.RHOS
    points = []
    for item in text.split(","):
        try:
            rho_text, seed_text = item.split(":")
            rho, seed = float(rho_text), int(seed_text)
        except ValueError:
            parser.error(f"--sweep-points: {item!r} is not RHO:SEED (e.g. 0.8:0)")
        if rho not in rhos + BEYOND_RHOS or seed not in seeds:
            parser.error(
                f"--sweep-points: {item!r} is not a point of this sweep; rho is one of "
                f"{list(rhos)} (or, beyond its left end, of {list(BEYOND_RHOS)}) and the seed "
                f"one of --seeds {list(seeds)}"
            )
        points.append((rho, seed))
    return points


def superseded(candidate: str, seeds: list[int], rows: list[dict[str, Any]]) -> bool:
    """Whether ``rows`` searched ``candidate`` at all of ``seeds`` (and maybe more)."""
    return any(r["candidate"] == candidate and set(seeds) <= set(r["seeds"]) for r in rows)


def page_rows(page: Path, header: str = "| candidate |") -> list[str]:
    """The rows of an existing page's first table whose header starts with ``header`` (by
    default the search table; none if there is no page or no such table)."""
    if not page.exists():
        return []
    lines = page.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    if start is None:
        return []
    rows = []
    for line in lines[start + 2 :]:  # after the header and its |---| line
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


def cells(line: str) -> list[str]:
    """A page row's cells."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def line_key(line: str) -> tuple[str, list[int]]:
    """(candidate, seeds) of a page row: its first and fourth cells."""
    row = cells(line)
    return row[0], json.loads(row[3])


def val_curve(history: list[dict[str, float]]) -> dict[int, float]:
    """Evaluation step -> validation loss, from a run's metrics rows."""
    return {int(row["step"]): row["val_loss"] for row in history if "val_loss" in row}


CEILING_HEADER = "| candidate | seed | dense iso-FLOP |"
PROBE_HEADER = "| candidate | seed | as routed |"


def kept_seed_rows(lines: Sequence[str], fresh: set[tuple[str, int]]) -> list[str]:
    """The rows (of a per-seed table of the page before) whose (candidate, seed) this call did
    not compute: a new clone has the runs' records but not the weights a probe needs, and a
    call without ``--ceiling`` does not read the ceiling runs, yet the page keeps both."""
    return [line for line in lines if (cells(line)[0], int(cells(line)[1])) not in fresh]


def ceiling_section(rows: list[dict[str, Any]], kept: Sequence[str] = ()) -> list[str]:
    """The page's table of the seeds searched with ``--ceiling``, a line each, then the
    ``kept`` lines of seeds this call did not (none of either: no section)."""
    runs = [
        (r["candidate"], seed, dense, moe, ceiling)
        for r in rows
        for seed, dense, moe, ceiling in zip(
            r["seeds"],
            r["dense_val_loss"],
            r["moe_val_loss"],
            r.get("ceiling_val_loss") or [],  # rows of calls without --ceiling: none
            strict=False,
        )
        if ceiling is not None
    ]
    kept = kept_seed_rows(kept, {(name, seed) for name, seed, *_ in runs})
    if not runs and not kept:
        return []
    lines = [
        "## What the experts' parameters could buy",
        "",
        "`--ceiling` also trains the dense model with all of an MoE layer's experts (routed and",
        "shared) in every FFN (`compare.dense_iso_param`): the MoE's parameters without routing,",
        "at (experts + shared) / (top-k + shared) times the FFN FLOPs. Its gain over the iso-FLOP",
        "dense model is what those parameters buy at that setting and seed without routing, to",
        "set beside the MoE's margin over the same dense model.",
        "",
        "| candidate | seed | dense iso-FLOP | MoE | dense iso-parameter | gain of the parameters "
        "| MoE's margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, seed, dense, moe, ceiling in runs:
        lines.append(
            f"| {name} | {seed} | {dense:.4f} | {moe:.4f} | {ceiling:.4f} | {dense - ceiling:+.4f} "
            f"| {dense - moe:+.4f} |"
        )
    return [*lines, *kept, ""]


def probe_section(rows: list[dict[str, Any]], kept: Sequence[str] = ()) -> list[str]:
    """The page's table of ``--probe-routing`` results, a line per probed seed, then the
    ``kept`` lines of seeds this call did not probe."""
    probed = [
        (r["candidate"], seed, p)
        for r in rows
        for seed, p in zip(r["seeds"], r.get("routing_probe") or [], strict=False)
        if p is not None
    ]
    kept = kept_seed_rows(kept, {(name, seed) for name, seed, _ in probed})
    if not probed and not kept:
        return []
    lines = [
        "## Are the experts idle?",
        "",
        f"`--probe-routing` scores each trained MoE on the first {PROBE_WINDOWS} held-out windows",
        "as routed, with every token sent to top-k experts drawn at random (gate weights 1/k), and",
        "with its routed experts removed (the shared expert kept). Idle or interchangeable experts",
        "make random routing cost little; specialised ones make it cost about as much as having",
        "none (share: random's cost over none's).",
        "",
        "| candidate | seed | as routed | random routing | no routed experts | share |",
        "|---|---|---|---|---|---|",
    ]
    for name, seed, p in probed:
        cost, none = p["random"] - p["learned"], p["none"] - p["learned"]
        share = f"{cost / none:.0%}" if none > 0 else "-"
        lines.append(
            f"| {name} | {seed} | {p['learned']:.4f} | {p['random']:.4f} | {p['none']:.4f} | "
            f"{share} |"
        )
    return [*lines, *kept, ""]


def write_page(
    page: Path,
    rows: list[dict[str, Any]],
    *,
    machine: str,
    sweep: tuple[dict[str, Any], dict[str, Any], Path] | None = None,
    kept: Sequence[str] = (),
    beyond: list[dict[str, Any]] | None = None,
) -> None:
    """docs/moe_baseline.md: the search's table (``rows``, then the ``kept`` rows of the page
    before), then (``sweep``: the candidate, the allocation experiment's results and their
    folder) the sweep's section and plot."""
    lines = [
        "# A baseline that earns its parameters (issue 12, item 7)",
        "",
        "Written by `python recipes/moe_baseline.py` (every candidate searched so far; machine:",
        f"{machine}). Each candidate trains the MoE and the dense model with the",
        "same activated FFN width (`compare.dense_iso_flop`) at every seed; the margin is dense -",
        f"MoE (positive: the MoE is better). *Clear*: mean margin > {MIN_MARGIN} nats and > twice",
        "its seed standard deviation. Busiest expert: the most loaded routed expert over the mean",
        "at the last training step, worst MoE layer. Margin by step: the mean margin at each",
        "evaluation during training (the cosine schedule of the candidate's full length).",
        "Each finished run's result, with the machine and thread count it ran on, is kept in",
        "`docs/records/<digest>.json` (runs finished before those records began are not there).",
        "",
        "| candidate | MoE changes | training changes | seeds | MoE val loss | dense val loss "
        "| margin (mean ± sd) | busiest expert / mean | clear | margin by step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['candidate']} | {r['moe'] or '-'} | {r['train'] or '-'} | "
            f"{r.get('seeds', '?')} | {' / '.join(f'{x:.4f}' for x in r['moe_val_loss'])} | "
            f"{' / '.join(f'{x:.4f}' for x in r['dense_val_loss'])} | "
            + (
                f"{r['margin_mean']:+.4f} ± {r['margin_sd']:.4f} | "
                if len(r["margin"]) > 1
                else f"{r['margin_mean']:+.4f} (one seed) | "
            )
            + f"{statistics.fmean(r['imbalance']):.2f} | {'yes' if r['clear'] else 'no'} | "
            + ", ".join(f"{s}: {m:+.3f}" for s, m in r.get("margin_by_step", {}).items())
            + " |"
        )
    lines += kept
    lines.append("")
    lines += ceiling_section(rows, page_rows(page, CEILING_HEADER))
    lines += probe_section(rows, page_rows(page, PROBE_HEADER))
    if sweep is None:
        clear = [r["candidate"] for r in rows if r["clear"]]
        clear += [cells(line)[0] for line in kept if cells(line)[8] == "yes"]
        lines.append(
            f"Clear: {', '.join(clear)}; `--sweep` runs the allocation sweep at the first."
            if clear
            else "No candidate is clear, so no allocation sweep yet."
        )
        page.write_text("\n".join(lines) + "\n")
        return
    at, doc, plots = sweep
    img = page.parent / "img" / "moe_baseline"
    img.mkdir(parents=True, exist_ok=True)
    heading, _, body = allocation.report(doc).partition("\n")
    assert heading.startswith("## "), heading
    # The experiment's own plot link points at its make-demo figure; this page links its own.
    body = "\n".join(
        line for line in body.split("\n") if not re.match(r"!\[.*\]\(img/results/", line)
    )
    section = f"## Allocation sweep at {at['candidate']}\n{body}"
    for path in sorted(plots.glob("*.png")):
        shutil.copyfile(path, img / path.name)
        section += f"\n![{path.stem}](img/moe_baseline/{path.name})\n"
    lines.append(section)
    lines += beyond_section(beyond or [], doc)
    page.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
