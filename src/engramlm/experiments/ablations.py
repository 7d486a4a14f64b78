"""Ablations (paper §6.2, SPEC §4): remove one Engram component at a time, measure the loss.

The reference is the main job's Engram model: ``allocate(MoE, 0.75)`` with Engram at layer 1
(0-based; the paper's layer 2), 2- and 3-grams, one residual stream (``hc_mult=1``), the same
300-step recipe as ``compare``'s Engram (the mechanism experiments' pair shares the stored
run). Each variant changes one thing, in the paper's order, and is rebuilt with ``allocate`` so
that every model has the MoE's total parameters: removing a dense part (gate keys, conv) gives its
parameters to the table, and "same table budget" variants (2-grams only, 4-grams, two layers)
split the same rows differently.

- **w/o gating** - ``gate="none"``: alpha = 1, no key projections.
- **w/o multi-branch** - needs a hyper-connection backbone, so it is measured as a pair of its
  own at ``hc_mult=2``: the full multi-branch Engram vs ``multi_branch=False`` (one mHC
  pre-mapping fuses the two streams, one gate, the output spread back by the post-mapping).
  Deviation: the paper uses M = 4; M = 2 costs ~8% more time per step than M = 1 on CPU, M = 4
  ~40%, and the rest of the suite stays at M = 1 so that its reference is the main job's model.
- **w/o tokenizer compression** - ``compress_tokens=False``: the hash reads raw token ids.
- **w/o short conv** - ``short_conv=False``: Y = alpha * v.
- **w/o 3-gram** - ``max_ngram=2``: 2-grams only, the table budget all theirs.
- **layer placement** - one module at the deepest layer (0-based 3: the paper's layer 4 of 4)
  and two modules at 0-based layers 1 and 2 (the paper's reference has two, at its layers 2
  and 6 of 12), each at the same total table budget.
- **+ 4-gram** - ``max_ngram=4``: 2-, 3- and 4-grams sharing the same budget.

Capacity (not iso-parameter, on purpose): does the memory matter, or only Engram's extra dense
projections? The reference Engram with its tables shrunk - to 1/16 of the rows, and to the
smallest tables the hash allows (each head the smallest unused prime: 2, 3, 5, ... rows, a few
rows per head, "capacity ~1") - keeping every dense part and the 12 experts. With the pure MoE
(rho = 1) trained at the same seeds, the share of Engram's gain over the MoE that each keeps is
(MoE - variant) / (MoE - reference).

Seeds: every model is trained for each of ``ctx.seeds`` and deltas are paired by seed (same
data order). The noise floor is the reference's seed-to-seed range; with a single seed the
reference is also trained at one extra seed to measure it (its only use). A delta counts as a
regression only when it exceeds that range.

Default budget (one seed): 11 runs of 300 steps - two references at M = 1, the M = 2 reference,
eight ablations - about 40 minutes on 2 idle CPU cores, one run fewer when the mechanism
experiments have already trained the shared reference.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any

from engramlm.compare import DEFAULT_RHO
from engramlm.config import ModelConfig
from engramlm.experiments.common import Context
from engramlm.model import allocate, model_stats

FULL, FULL_MHC, MOE = "full", "full_mhc", "moe"
# Capacity variants: the reference's table rows scaled by this fraction (0: the smallest tables).
CAPACITY = {"rows_1_16": (1 / 16, "1/16 of the table rows"), "rows_min": (0.0, "smallest tables")}
MHC_BRANCHES = 2  # hc_mult of the multi-branch pair
# The paper (§6.2): 12-layer 3B MoE, 0.56B active, 100B tokens.
PAPER = {"moe": 1.808, "engram_two_layers": 1.768, "best_single_layer": 1.770}
# The paper's three largest regressions (SPEC §4).
PAPER_LARGEST = ("no_gate", "no_multi_branch", "no_compression")


@dataclass(frozen=True)
class Ablation:
    """One variant: what it changes in the Engram shape, against which reference."""

    key: str
    label: str
    engram: dict[str, Any] = field(default_factory=dict)  # EngramConfig changes
    reference: str = FULL
    paper: str = ""


def ablations(num_layers: int) -> list[Ablation]:
    """The variants in the paper's order, for a backbone of ``num_layers`` (>= 3) layers."""
    deepest = num_layers - 1
    return [
        Ablation("no_gate", "w/o context-aware gating", {"gate": "none"}, paper="large regression"),
        Ablation(
            "no_multi_branch",
            f"w/o multi-branch (M={MHC_BRANCHES})",
            {"multi_branch": False},
            reference=FULL_MHC,
            paper="large regression",
        ),
        Ablation(
            "no_compression",
            "w/o tokenizer compression",
            {"compress_tokens": False},
            paper="large regression",
        ),
        Ablation(
            "no_short_conv", "w/o short conv", {"short_conv": False}, paper="small regression"
        ),
        Ablation(
            "no_3gram",
            "w/o 3-gram (2-grams only, same budget)",
            {"max_ngram": 2},
            paper="no number in SPEC §4",
        ),
        Ablation(
            "deeper_layer",
            f"layer {deepest + 1} instead of 2 (1-based)",
            {"layer_ids": (deepest,)},
            paper="worse: a single module is best at layer 2 (1.770)",
        ),
        Ablation(
            "two_layers",
            "layers 2 and 3 (1-based), same budget",
            {"layer_ids": (1, 2)},
            paper="two modules (layers 2, 6 of 12): 1.768 vs 1.770 for the best single one",
        ),
        Ablation("plus_4gram", "+ 4-gram (same budget)", {"max_ngram": 4}, paper="slightly worse"),
    ]


def build_configs(ctx: Context) -> dict[str, ModelConfig]:
    """Every model of the suite by key: the references and one per ablation."""
    moe = dataclasses.replace(ctx.base_moe, vocab_size=ctx.corpus.vocab_size)
    if moe.num_layers < 3:  # the smoke backbone: room for a deeper layer than 1
        moe = dataclasses.replace(moe, num_layers=3)
    mhc = dataclasses.replace(moe, hc_mult=MHC_BRANCHES)
    shape = ctx.base_engram
    configs = {
        FULL: allocate(moe, DEFAULT_RHO, engram=shape),
        FULL_MHC: allocate(mhc, DEFAULT_RHO, engram=shape),
    }
    for ab in ablations(moe.num_layers):
        changes = dict(ab.engram)
        if "max_ngram" in changes:  # allocate sets the sizes; the count must match the orders
            changes["table_sizes"] = (shape.table_sizes[0],) * (changes["max_ngram"] - 1)
        backbone = mhc if ab.reference == FULL_MHC else moe
        variant = dataclasses.replace(shape, hc_mult=backbone.hc_mult, **changes)
        configs[ab.key] = allocate(backbone, DEFAULT_RHO, engram=variant)
    configs[MOE] = moe
    full = configs[FULL].engram
    assert full is not None
    for key, (fraction, _) in CAPACITY.items():
        sizes = tuple(max(2, int(size * fraction)) for size in full.table_sizes)
        configs[key] = dataclasses.replace(
            configs[FULL], engram=dataclasses.replace(full, table_sizes=sizes)
        )
    return configs


def _describe(cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
    stats = model_stats(cfg, seq_len=seq_len)
    e = cfg.engram
    assert e is not None  # every model of the suite has Engram
    return {
        "total_params": stats.total_params,
        "active_params": stats.active_params,
        "engram_table_params": stats.engram_table_params,
        "engram_dense_params": stats.engram_dense_params,
        "num_experts": cfg.num_experts,
        "hc_mult": cfg.hc_mult,
        "layer_ids": list(e.layer_ids),
        "max_ngram": e.max_ngram,
        "table_sizes": list(e.table_sizes),
    }


def run(ctx: Context) -> dict[str, Any]:
    """Train the references and every ablation for each seed; deltas, verdict data, plots."""
    configs = build_configs(ctx)
    train_cfg = ctx.train_config()
    seeds = list(ctx.seeds)
    noise_seeds = seeds if len(seeds) > 1 else [seeds[0], seeds[0] + 1]

    def train(key: str, seed: int) -> dict[str, Any]:
        result = ctx.train(f"{key}-seed{seed}", configs[key], ctx.train_config(seed=seed))
        curve = [[h["step"], h["val_loss"]] for h in result.history if "val_loss" in h]
        return {"val_loss": result.val_loss, "curve": curve, "seconds": result.train_seconds}

    refs = {
        FULL: {s: train(FULL, s) for s in noise_seeds},
        FULL_MHC: {s: train(FULL_MHC, s) for s in seeds},
    }
    ref_losses = [refs[FULL][s]["val_loss"] for s in noise_seeds]
    noise = max(ref_losses) - min(ref_losses)
    rows = []
    for ab in ablations(configs[FULL].num_layers):
        runs = {s: train(ab.key, s) for s in seeds}
        losses = [runs[s]["val_loss"] for s in seeds]
        deltas = [runs[s]["val_loss"] - refs[ab.reference][s]["val_loss"] for s in seeds]
        mean = statistics.fmean(deltas)
        rows.append(
            {
                "key": ab.key,
                "label": ab.label,
                "reference": ab.reference,
                "paper": ab.paper,
                "val_loss": losses,
                "val_loss_mean": statistics.fmean(losses),
                "delta": deltas,
                "delta_mean": mean,
                "delta_min": min(deltas),
                "delta_max": max(deltas),
                "effect": effect(mean, noise),
                "curve": runs[seeds[0]]["curve"],
                "params": _describe(configs[ab.key], train_cfg.seq_len),
            }
        )
    capacity = _capacity(configs, refs[FULL], {s: train(MOE, s) for s in seeds}, seeds, train)
    references = {
        key: {
            "val_loss": [refs[key][s]["val_loss"] for s in refs[key]],
            "seeds": list(refs[key]),
            "curve": refs[key][seeds[0]]["curve"],
            "params": _describe(configs[key], train_cfg.seq_len),
        }
        for key in (FULL, FULL_MHC)
    }
    _plot(ctx, rows, references, noise)
    return {
        "train": {"steps": train_cfg.steps, "seq_len": train_cfg.seq_len},
        "rho": DEFAULT_RHO,
        "noise_seeds": noise_seeds,
        "noise": noise,
        "references": references,
        "ablations": rows,
        "capacity": capacity,
        "summary": summarise(rows, noise, references[FULL]["params"]["total_params"]),
        "paper": PAPER,
    }


def _capacity(
    configs: dict[str, ModelConfig],
    full: dict[int, dict[str, Any]],
    moe: dict[int, dict[str, Any]],
    seeds: list[int],
    train: Any,
) -> dict[str, Any]:
    """The capacity variants against the reference and the pure MoE, paired by seed."""
    gains = [moe[s]["val_loss"] - full[s]["val_loss"] for s in seeds]
    rows = []
    for key, (fraction, label) in CAPACITY.items():
        runs = {s: train(key, s) for s in seeds}
        kept = [
            (moe[s]["val_loss"] - runs[s]["val_loss"]) / gain if gain else float("nan")
            for s, gain in zip(seeds, gains, strict=True)
        ]
        stats = model_stats(configs[key])
        rows.append(
            {
                "key": key,
                "label": label,
                "fraction": fraction,
                "val_loss": [runs[s]["val_loss"] for s in seeds],
                "delta": [runs[s]["val_loss"] - full[s]["val_loss"] for s in seeds],
                "gain_kept": kept,
                "table_rows": stats.engram_table_params // configs[key].engram.head_dim,
                "engram_table_params": stats.engram_table_params,
            }
        )
    return {
        "moe_val_loss": [moe[s]["val_loss"] for s in seeds],
        "full_val_loss": [full[s]["val_loss"] for s in seeds],
        "gain": gains,
        "full_table_rows": model_stats(configs[FULL]).engram_table_params
        // configs[FULL].engram.head_dim,
        "variants": rows,
    }


def effect(delta: float, noise: float) -> str:
    """ "worse" / "better" when ``delta`` (vs the reference) exceeds the noise floor."""
    return "worse" if delta > noise else "better" if delta < -noise else "within noise"


def summarise(rows: list[dict[str, Any]], noise: float, full_params: int) -> dict[str, Any]:
    """Ranks and the checks the verdict states, from the deltas alone."""
    single = [r["params"]["total_params"] for r in rows if r["reference"] == FULL]
    params_spread = (max(single + [full_params]) - min(single + [full_params])) / full_params
    ranked = sorted(rows, key=lambda r: -r["delta_mean"])
    rank = {r["key"]: i + 1 for i, r in enumerate(ranked)}
    delta = {r["key"]: r["delta_mean"] for r in rows}
    largest = list(PAPER_LARGEST)
    top = {r["key"] for r in ranked[: len(largest)]}
    return {
        "ranking": [r["key"] for r in ranked],
        "rank": rank,
        "regressions": [r["key"] for r in ranked if r["effect"] == "worse"],
        "improvements": [r["key"] for r in ranked if r["effect"] == "better"],
        "paper_largest_are_top": top == set(largest),
        "paper_largest_regress": all(delta[k] > noise for k in largest),
        "short_conv_smaller_than_largest": all(delta["no_short_conv"] < delta[k] for k in largest),
        "noise": noise,
        "params_spread": params_spread,
    }


def _plot(
    ctx: Context, rows: list[dict[str, Any]], refs: dict[str, dict[str, Any]], noise: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    y = list(range(len(rows)))[::-1]
    means = [r["delta_mean"] for r in rows]
    err = [
        [r["delta_mean"] - r["delta_min"] for r in rows],
        [r["delta_max"] - r["delta_mean"] for r in rows],
    ]
    colors = ["tab:red" if r["key"] in PAPER_LARGEST else "tab:blue" for r in rows]
    several = len(rows[0]["delta"]) > 1
    ax.barh(y, means, xerr=err if several else None, color=colors, alpha=0.8, capsize=3)
    ax.axvspan(-noise, noise, color="grey", alpha=0.2, label="reference seed-to-seed range")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [r["label"] for r in rows])
    ax.set(
        xlabel="validation loss - full Engram (nats; > 0 = worse)",
        title="Engram ablations (red: the paper's largest regressions)",
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ctx.savefig(fig, "ablation_deltas")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, ref in refs.items():
        steps, losses = zip(*ref["curve"], strict=True) if ref["curve"] else ((), ())
        ax.plot(steps, losses, "k-" if key == FULL else "k--", lw=2, label=f"reference ({key})")
    for r in rows:
        if r["curve"]:
            steps, losses = zip(*r["curve"], strict=True)
            ax.plot(steps, losses, marker=".", lw=1, label=r["label"])
    ax.set(xlabel="step", ylabel="validation loss (nats)", title="held-out loss during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ctx.savefig(fig, "ablation_curves")


def report(doc: dict[str, Any]) -> str:
    """The markdown section for docs/results.md, verdict computed from the numbers."""
    res = doc["results"]
    minutes = doc["wall_seconds"] / 60
    refs = res["references"]
    full, mhc = refs[FULL], refs[FULL_MHC]
    lines = [
        "## Ablations (`engramlm experiment ablations`)",
        "",
        f"Command: `{doc['command']}` (scale {doc['scale']:g}, seeds {doc['seeds']}, "
        f"{res['train']['steps']} steps of {res['train']['seq_len']}-token windows per model). "
        f"Machine: {doc['machine']}. Wall time: {minutes:.1f} min.",
        "",
        f"Reference: the main job's Engram model (allocate(MoE, {res['rho']:g}), Engram at layer 2 "
        f"(1-based), 2- and 3-grams, one residual stream), val loss "
        f"{_fmt_losses(full['val_loss'])} over seeds {full['seeds']}; the multi-branch pair uses "
        f"its own reference with {mhc['params']['hc_mult']} residual streams "
        f"({_fmt_losses(mhc['val_loss'])}). Each variant is rebuilt with `allocate` at the "
        f"MoE's total parameters ({full['params']['total_params'] / 1e6:.2f}M; equal within "
        f"{100 * res['summary']['params_spread']:.2f}% from prime table sizes; the M = "
        f"{mhc['params']['hc_mult']} models add the hyper-connections on top), so a removed dense "
        "part goes to the table and the same-budget variants split the same rows. Noise floor: "
        f"the reference's seed-to-seed range, {res['noise']:.4f} nats.",
        "",
        "| ablation (paper's order) | val loss | Δ vs reference (min..max over seeds) | effect | "
        "Engram table | paper (§6.2) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["ablations"]:
        spread = f" ({r['delta_min']:+.4f}..{r['delta_max']:+.4f})" if len(r["delta"]) > 1 else ""
        lines.append(
            f"| {r['label']} | {r['val_loss_mean']:.4f} | {r['delta_mean']:+.4f}{spread} | "
            f"{r['effect']} | {r['params']['engram_table_params'] / 1e6:.2f}M | {r['paper']} |"
        )
    paper = res["paper"]
    lines += [
        "",
        f"Paper (§6.2; 12-layer 3B MoE, 0.56B active, 100B tokens): MoE {paper['moe']}, + 1.6B "
        f"Engram at layers 2 and 6: {paper['engram_two_layers']:.3f}; the best single layer (2) "
        f"{paper['best_single_layer']:.3f}. Largest regressions when removing multi-branch fusion, "
        "context-aware gating or tokenizer compression; removing the short conv costs little; "
        "4-grams at the same budget are slightly worse.",
        "",
        *_capacity_report(res),
        "![ablation deltas](img/results/ablations/ablation_deltas.png)",
        "![ablation curves](img/results/ablations/ablation_curves.png)",
        "",
        "**Verdict:** " + verdict(res),
    ]
    return "\n".join(lines) + "\n"


def _capacity_report(res: dict[str, Any]) -> list[str]:
    """The capacity table: does the memory matter, or only the extra projections?"""
    cap = res.get("capacity")
    if not cap:  # results written before the capacity variants existed
        return []

    def mean_sd(xs: list[float]) -> str:
        sd = f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else ""
        return f"{statistics.fmean(xs):.4f}{sd}"

    lines = [
        "Capacity (same dense parts and experts, tables shrunk; not iso-parameter): how much of "
        f"Engram's gain over the pure MoE (MoE {mean_sd(cap['moe_val_loss'])}, reference Engram "
        f"{mean_sd(cap['full_val_loss'])} with {cap['full_table_rows']:,} rows; gain "
        f"{mean_sd(cap['gain'])} nats) each keeps, paired by seed:",
        "",
        "| tables | rows | val loss | Δ vs reference | share of the gain kept |",
        "|---|---|---|---|---|",
    ]
    for r in cap["variants"]:
        kept = [100 * k for k in r["gain_kept"]]
        sd = f" ± {statistics.stdev(kept):.0f}%" if len(kept) > 1 else ""
        lines.append(
            f"| {r['label']} | {r['table_rows']:,} | {mean_sd(r['val_loss'])} | "
            f"{statistics.fmean(r['delta']):+.4f} | {statistics.fmean(kept):.0f}%{sd} |"
        )
    return [*lines, ""]


def _fmt_losses(losses: list[float]) -> str:
    if len(losses) == 1:
        return f"{losses[0]:.4f}"
    return f"{statistics.fmean(losses):.4f} (range {min(losses):.4f}..{max(losses):.4f})"


def verdict(res: dict[str, Any]) -> str:
    """Plain sentences from the summary: which ablations hurt beyond noise, does the order hold."""
    s = res["summary"]
    label = {r["key"]: r["label"] for r in res["ablations"]}
    n = len(res["ablations"])

    def names(keys: list[str]) -> str:
        return ", ".join(label[k] for k in keys) if keys else "none"

    parts = [
        f"regressions beyond the noise floor ({s['noise']:.4f} nats): {names(s['regressions'])}; "
        f"improvements beyond it: {names(s['improvements'])}."
    ]
    ranks = ", ".join(f"{label[k]} #{s['rank'][k]}" for k in PAPER_LARGEST)
    if s["paper_largest_are_top"] and s["paper_largest_regress"]:
        parts.append(
            f"The paper's three largest regressions are the top three of {n} here ({ranks}) and "
            "all exceed the noise: ranking reproduced."
        )
    elif s["paper_largest_are_top"]:
        parts.append(
            f"The paper's three largest regressions rank top three of {n} here ({ranks}), but not "
            "all exceed the noise: the ranking is suggestive, not established."
        )
    else:
        parts.append(
            f"The paper's three largest regressions rank {ranks} of {n} here: ranking not "
            "reproduced."
        )
    parts.append(
        "Removing the short conv costs "
        + (
            "less than each of those three"
            if s["short_conv_smaller_than_largest"]
            else "at least as much as one of those three"
        )
        + " (paper: small)."
    )
    row = {r["key"]: r for r in res["ablations"]}

    def shown(key: str) -> str:
        return f"{row[key]['delta_mean']:+.4f}, {row[key]['effect']}"

    parts.append(
        f"A deeper single layer: {shown('deeper_layer')} (paper: layer 2 best); two layers: "
        f"{shown('two_layers')} (paper: slightly better); 4-grams at the same budget: "
        f"{shown('plus_4gram')} (paper: slightly worse)."
    )
    return " ".join(parts)
