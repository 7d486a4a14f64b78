"""Infinite memory (paper §3.2, SPEC §4): loss vs Engram table size at a fixed backbone.

The backbone is the base MoE, unchanged (not ``allocate``: no expert moves), plus one memory
module whose table grows: Engram at layer 1 (0-based; the paper's layer 2), or, as the paper's
baseline, Over-Encoding (``engramlm.overencoding``: the same hashed n-gram tables, averaged into
the input embedding) with the *same* table shape, so both read identical table parameter
counts at every size. The pure MoE (no memory) is trained too, as the zero-memory reference.

The paper (3B MoE, 568M active, 100B tokens; 2.58e5 to 1.0e7 slots) finds validation loss
linear in log(slots) and Engram below Over-Encoding at equal memory. We fit loss = a + b
log10(table params) per method (slope b per decade and R^2; the power-law exponent is the slope
of ln(loss) on ln(params)) and compare the two methods size by size.

Sizes: per-head table sizes :data:`SIZES` (each head rounds up to a distinct prime), ~3.2x
apart, spanning 33x in table parameters: four sizes instead of five at ~2.4x apart keeps the
default within the CPU budget (8 trained models + the MoE, which the allocation sweep shares).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from engramlm.config import ModelConfig
from engramlm.experiments.allocation import fmt_loss, spread
from engramlm.experiments.common import Context
from engramlm.model import model_stats

# Rows per head before primes (x 16 heads x 16 dims = table params: 0.27M to 9.0M, 33x). Small
# sizes round up more (each head takes the next unused prime), so the spans are of the params.
SIZES = (1000, 3300, 10500, 35000)
SMOKE_SIZES = (60, 200, 650, 2100)  # 31x
KINDS = {"engram": "Engram (layer 1)", "overencoding": "Over-Encoding (input)"}
R2_LOG_LINEAR = 0.9  # the verdict calls a fit log-linear at or above this R^2


def memory_configs(ctx: Context, per_head: int) -> dict[str, ModelConfig]:
    """The base MoE plus Engram, and plus Over-Encoding, with ``per_head`` rows per head."""
    shape = dataclasses.replace(
        ctx.base_engram, table_sizes=(per_head,) * ctx.base_engram.num_orders
    )
    return {
        "engram": dataclasses.replace(ctx.base_moe, engram=shape),
        "overencoding": dataclasses.replace(
            ctx.base_moe, overencoding=dataclasses.replace(shape, layer_ids=(0,))
        ),
    }


def fit_log_linear(params: list[float], losses: list[float]) -> dict[str, float]:
    """loss = intercept + slope * log10(params) by least squares, its R^2, and the power-law
    exponent alpha of loss ~ params^-alpha (minus the slope of ln(loss) on ln(params))."""
    import numpy as np

    x, y = np.log10(np.asarray(params, dtype=float)), np.asarray(losses, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    ss_res = float(((y - (intercept + slope * x)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    alpha = -float(np.polyfit(np.log(10**x), np.log(y), 1)[0])
    return {
        "slope_per_decade": float(slope),
        "intercept": float(intercept),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0,
        "power_law_alpha": alpha,
    }


def run(ctx: Context) -> dict[str, Any]:
    """Train the MoE, then Engram and Over-Encoding at every table size; fit, plot."""
    sizes = SMOKE_SIZES if ctx.smoke else SIZES
    train_cfg = ctx.train_config()
    vocab = ctx.corpus.vocab_size

    def train_all(key: str, cfg: ModelConfig) -> list[float]:
        return [
            ctx.train(f"{key}_seed{seed}", cfg, ctx.train_config(seed=seed)).val_loss
            for seed in ctx.seeds
        ]

    moe_losses = train_all("moe", ctx.base_moe)
    moe_stats = model_stats(dataclasses.replace(ctx.base_moe, vocab_size=vocab), train_cfg.seq_len)
    rows = []
    for per_head in sizes:
        for kind, cfg in memory_configs(ctx, per_head).items():
            stats = model_stats(dataclasses.replace(cfg, vocab_size=vocab), train_cfg.seq_len)
            table = stats.engram_table_params + stats.overencoding_table_params
            dense = stats.engram_dense_params + stats.overencoding_dense_params
            losses = train_all(f"{kind}_{per_head}", cfg)
            rows.append(
                {
                    "kind": kind,
                    "per_head_size": per_head,
                    "table_params": table,
                    "slots": table // ctx.base_engram.head_dim,
                    "dense_params": dense,
                    "active_params": stats.active_params,
                    "flops_per_token": stats.flops_per_token,
                    "val_loss": losses,
                    "val_loss_mean": statistics.fmean(losses),
                    "val_loss_std": spread(losses),
                }
            )
    fits = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        fits[kind] = fit_log_linear(
            [r["table_params"] for r in mine], [r["val_loss_mean"] for r in mine]
        )
    moe = {
        "val_loss": moe_losses,
        "val_loss_mean": statistics.fmean(moe_losses),
        "val_loss_std": spread(moe_losses),
        "active_params": moe_stats.active_params,
        "flops_per_token": moe_stats.flops_per_token,
    }
    results = {
        "moe": moe,
        "rows": rows,
        "fits": fits,
        "comparison": compare(rows),
        "train": train_cfg.to_dict(),
    }
    ctx.savefig(plot(rows, fits, moe), "loss_vs_memory")
    return results


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per table size: Over-Encoding minus Engram (positive = Engram lower), and the noise
    scale 2 sqrt(std_E^2 + std_OE^2) (0 with one seed)."""
    out = []
    for per_head in sorted({r["per_head_size"] for r in rows}):
        e, o = (
            next(r for r in rows if r["kind"] == k and r["per_head_size"] == per_head)
            for k in KINDS
        )
        out.append(
            {
                "per_head_size": per_head,
                "table_params": e["table_params"],
                "equal_table_params": e["table_params"] == o["table_params"],
                "oe_minus_engram": o["val_loss_mean"] - e["val_loss_mean"],
                "noise": 2 * math.hypot(e["val_loss_std"], o["val_loss_std"]),
            }
        )
    return out


def plot(rows: list[dict[str, Any]], fits: dict[str, dict[str, float]], moe: dict) -> Any:
    """Validation loss vs table parameters (log x), both methods, fits dashed, MoE dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (kind, label), color in zip(KINDS.items(), ("C0", "C1"), strict=True):
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["table_params"])
        x = np.array([r["table_params"] for r in mine], dtype=float)
        fit = fits[kind]
        ax.errorbar(
            x,
            [r["val_loss_mean"] for r in mine],
            yerr=[r["val_loss_std"] for r in mine],
            marker="o",
            capsize=3,
            color=color,
            label=f"{label}: {fit['slope_per_decade']:+.4f}/decade, R²={fit['r2']:.2f}",
        )
        ax.plot(x, fit["intercept"] + fit["slope_per_decade"] * np.log10(x), "--", color=color)
    ax.axhline(moe["val_loss_mean"], color="gray", ls=":", label="MoE, no memory")
    ax.set_xscale("log")
    ticks = sorted({r["table_params"] for r in rows})
    ax.set_xticks(ticks, [f"{t / 1e6:.3g}M" if t >= 1e6 else f"{t / 1e3:.3g}K" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(
        xlabel="memory table parameters (log scale)",
        ylabel="validation loss (nats)",
        title="Memory scaling at a fixed MoE backbone",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def report(doc: dict[str, Any]) -> str:
    """The markdown section for docs/results.md, verdict computed from the numbers."""
    res = doc["results"]
    moe, fits = res["moe"], res["fits"]
    seeds = doc["seeds"]
    by = {(r["kind"], r["per_head_size"]): r for r in res["rows"]}
    lines = [
        "## Infinite memory: table size vs loss (`engramlm experiment scaling`)",
        "",
        f"Command: `{doc['command']}` (scale {doc['scale']:g}, seeds {seeds}, "
        f"{res['train']['steps']} steps per model). Machine: {doc['machine']}. "
        f"Wall time: {doc['wall_seconds'] / 60:.1f} min.",
        "",
        "Fixed backbone (the base MoE, no expert moved) plus one memory whose table grows: "
        "Engram at layer 1, or Over-Encoding (hashed n-gram rows averaged into the input "
        "embedding, arXiv 2501.16975) with the same table shape, hence the same table "
        "parameters at each size.",
        "",
        "| rows/head | slots | table params | Engram val loss | Over-Encoding val loss | "
        "OE - Engram |",
        "|---|---|---|---|---|---|",
        f"| 0 (MoE) | 0 | 0 | {fmt_loss(moe, len(seeds))} | | |",
    ]
    for c in res["comparison"]:
        e, o = by[("engram", c["per_head_size"])], by[("overencoding", c["per_head_size"])]
        lines.append(
            f"| {c['per_head_size']:,} | {e['slots']:,} | {c['table_params'] / 1e6:.3f}M | "
            f"{fmt_loss(e, len(seeds))} | {fmt_loss(o, len(seeds))} | "
            f"{c['oe_minus_engram']:+.4f} |"
        )
    engram = next(r for r in res["rows"] if r["kind"] == "engram")
    oe = next(r for r in res["rows"] if r["kind"] == "overencoding")
    lines += [
        "",
        "| fit: loss = a + b log10(table params) | slope b (nats/decade) | R² | "
        "power-law exponent |",
        "|---|---|---|---|",
    ]
    for kind, label in KINDS.items():
        f = fits[kind]
        lines.append(
            f"| {label} | {f['slope_per_decade']:+.4f} | {f['r2']:.3f} | "
            f"{f['power_law_alpha']:.4f} |"
        )
    lines += [
        "",
        f"Besides the table (constant over sizes): Engram adds {engram['dense_params']:,} dense "
        f"parameters (projections, norms, conv), Over-Encoding {oe['dense_params']:,} (one "
        f"projection); forward FLOPs/token: MoE {moe['flops_per_token'] / 1e6:.2f}M, with "
        f"Engram {engram['flops_per_token'] / 1e6:.2f}M, with Over-Encoding "
        f"{oe['flops_per_token'] / 1e6:.2f}M.",
        "",
        "Paper (§3.2: 3B MoE, 568M active, 100B tokens; 2.58e5 to 1.0e7 slots, up to ~13B "
        "params): validation loss linear in log(slots), i.e. a power law; Engram below "
        "Over-Encoding at equal memory.",
        "",
        "![loss vs memory](img/results/scaling/loss_vs_memory.png)",
        "",
        "**Verdict:** " + verdict(res, len(seeds)),
    ]
    return "\n".join(lines) + "\n"


def trend(label: str, fit: dict[str, float]) -> str:
    """One sentence on one method's fit."""
    b, r2 = fit["slope_per_decade"], fit["r2"]
    head = f"{label}: {b:+.4f} nats per decade of table parameters, R² = {r2:.2f}"
    if b >= 0:
        return f"{head}: not reproduced, the loss does not fall as the table grows."
    if r2 >= R2_LOG_LINEAR:
        return f"{head}: loss falls log-linearly, as in the paper."
    return f"{head}: loss falls, but not cleanly log-linearly (R² < {R2_LOG_LINEAR})."


def verdict(res: dict[str, Any], num_seeds: int) -> str:
    """Sentences computed from the fits and the size-by-size comparison."""
    parts = [trend(label, res["fits"][kind]) for kind, label in KINDS.items()]
    comparison = res["comparison"]
    wins = [c for c in comparison if c["oe_minus_engram"] > 0]
    sentence = (
        f"Engram is below Over-Encoding at {len(wins)} of {len(comparison)} sizes "
        f"(OE - Engram from {min(c['oe_minus_engram'] for c in comparison):+.4f} to "
        f"{max(c['oe_minus_engram'] for c in comparison):+.4f} nats)"
    )
    if num_seeds > 1:
        clear = [c for c in wins if c["oe_minus_engram"] > c["noise"]]
        sentence += f", by more than two combined seed standard deviations at {len(clear)}"
    else:
        sentence += "; one seed, so no spread to judge these differences against"
    sentence += (
        ": the paper's ordering reproduced."
        if len(wins) == len(comparison)
        else ": the paper's ordering not reproduced at every size."
    )
    parts.append(sentence)
    moe = res["moe"]["val_loss_mean"]
    largest = max(res["rows"], key=lambda r: (r["kind"] == "engram", r["table_params"]))
    parts.append(
        f"Largest Engram table minus the memory-free MoE: "
        f"{largest['val_loss_mean'] - moe:+.4f} nats."
    )
    oe_rows = [r for r in res["rows"] if r["kind"] == "overencoding"]
    worse = [r for r in oe_rows if r["val_loss_mean"] > moe]
    if oe_rows and len(worse) == len(oe_rows):
        parts.append(
            "Caveat: Over-Encoding as built here is worse than the memory-free MoE at every size "
            f"({min(r['val_loss_mean'] for r in oe_rows):.4f} at best vs {moe:.4f}), so beating "
            "it says little about Engram against a well-tuned input-side n-gram baseline. A "
            "likely cause, not isolated here: its mean over the token embedding and the "
            "projected n-gram rows shrinks the token embedding by 1/(1 + H)."
        )
    return " ".join(parts)
