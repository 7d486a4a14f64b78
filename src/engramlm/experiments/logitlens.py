"""LogitLens (paper §6.1, SPEC §4 "Mechanism"): how early each layer reaches the final prediction.

For every block l = 1..L of the shared pair (:mod:`engramlm.experiments.pair`), the residual
stream after it (streams merged by their mean, as the model does) goes through the model's own
``final_norm`` and ``lm_head``; we report KL(p_final || p_l) = sum_v p_final(v) (log p_final(v) -
log p_l(v)) in nats, averaged over every token of the first held-out validation windows. The
paper finds the KL lower for Engram, most in the early layers: the lookup hands the early layers
the static local patterns they would otherwise spend depth recomposing.

The plain logit lens: each model's own final norm and head, no learned per-layer translators
("tuned lens"). The last layer's KL is 0 by construction; the verdict reads layers 1..L-1.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from engramlm.experiments.common import Context
from engramlm.experiments.pair import (
    ENGRAM,
    LABELS,
    MOE,
    batches,
    block_outputs,
    device_of,
    engram_layers,
    header,
    heldout_windows,
    layerwise,
    trained_pairs,
)
from engramlm.model import EngramLM

logger = logging.getLogger(__name__)

NUM_WINDOWS = 64  # held-out windows of seq_len tokens (8,192 tokens at the default size)
SMOKE_WINDOWS = 4


@torch.no_grad()
def layer_kl(model: EngramLM, ids: Tensor) -> list[float]:
    """Mean KL(p_final || p_l) in nats over all tokens of ``ids`` [W, T], for each block l."""
    totals = [0.0] * len(model.layers)
    count = 0
    with block_outputs(model) as outputs:
        for chunk in batches(ids, device_of(model)):
            final = model(chunk).logits.float().log_softmax(dim=-1)  # [B, T, V]
            p_final = final.exp()
            for layer, h in enumerate(outputs):  # h: [B, T, D]
                lens = model.lm_head(model.final_norm(h)).float().log_softmax(dim=-1)
                totals[layer] += float((p_final * (final - lens)).sum())
            count += chunk.numel()
    return [t / count for t in totals]


def run(ctx: Context) -> dict[str, Any]:
    pairs = trained_pairs(ctx)
    ids, _ = heldout_windows(
        pairs.corpus, pairs.seq_len, SMOKE_WINDOWS if ctx.smoke else NUM_WINDOWS
    )
    per_seed: dict[str, list[list[float]]] = {MOE: [], ENGRAM: []}
    for pair in pairs.pairs:
        for key, model in pair.models.items():
            per_seed[key].append(layer_kl(model, ids))
            logger.info("logitlens seed %d %s: %s", pair.seed, key, per_seed[key][-1])
    num_layers = len(per_seed[MOE][0])
    results = {
        "pair": pairs.summary(),
        "tokens": ids.numel(),
        "layers": list(range(1, num_layers + 1)),
        "engram_layers": engram_layers(pairs.pairs[0].models[ENGRAM]),
        "kl": {key: {"per_seed": v, **layerwise(v)} for key, v in per_seed.items()},
    }
    plot(ctx, results)
    return results


def plot(ctx: Context, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    layers = results["layers"]
    for key in (MOE, ENGRAM):
        kl = results["kl"][key]
        ax.errorbar(layers, kl["mean"], yerr=kl["std"], marker="o", capsize=3, label=LABELS[key])
    for i, layer in enumerate(results["engram_layers"]):
        ax.axvline(layer, color="grey", ls="--", lw=0.8, label="Engram block" if i == 0 else None)
    ax.set(
        xlabel="layer l (residual stream after block l)",
        ylabel="KL(final || layer l), nats",
        title=f"LogitLens on {results['tokens']:,} held-out tokens",
        xticks=layers,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    ctx.savefig(fig, "logitlens")


def verdict(results: dict[str, Any]) -> str:
    """A sentence computed from the numbers: is Engram's KL lower, and where most?"""
    layers = results["layers"][:-1]  # the last layer is 0 for both by construction
    if not layers:
        return "Not measurable: the models have a single layer."
    moe, eng = results["kl"][MOE], results["kl"][ENGRAM]
    gaps = [moe["mean"][i] - eng["mean"][i] for i in range(len(layers))]
    lower = [layer for layer, gap in zip(layers, gaps, strict=True) if gap > 0]
    best = layers[max(range(len(layers)), key=lambda i: gaps[i])]
    early = best <= math.ceil(len(layers) / 2)
    half = "early" if early else "late"
    where = f"the largest gap in Engram's favour is at layer {best} ({half} half)"
    if len(moe["per_seed"]) > 1:
        beyond = sum(gap > math.hypot(moe["std"][i], eng["std"][i]) for i, gap in enumerate(gaps))
        noise = f"; the gap exceeds the seed spread at {beyond} of {len(layers)} layers"
    else:
        noise = "; one seed, so no spread to compare the gaps with"
    if len(lower) == len(layers):
        status = "**Reproduced**" if early else "**Partly reproduced** (not most in early layers)"
        head = f"{status}: Engram's KL is lower at every non-final layer"
    elif lower:
        head = (
            f"**Partly reproduced**: Engram's KL is lower at {len(lower)} of {len(layers)} "
            f"non-final layers ({', '.join(map(str, lower))})"
        )
    else:
        head = "**Not reproduced**: Engram's KL is not lower at any non-final layer"
    higher = [
        f"layer {layer} ({-gap:.3f} nats higher)"
        for layer, gap in zip(layers, gaps, strict=True)
        if gap < 0
    ]
    against = f"; Engram's KL is higher at {', '.join(higher)}" if higher and lower else ""
    return f"{head}; {where}{against}{noise}."


def report(doc: dict[str, Any]) -> str:
    r = doc["results"]
    lines = header(doc, "LogitLens: per-layer KL to the final prediction")
    lines += [
        f"KL(p_final || p_l) in nats, mean ± std over seeds, on {r['tokens']:,} held-out tokens; "
        f"layer l is the residual stream after block l (Engram in block "
        f"{', '.join(map(str, r['engram_layers']))}). The last layer is 0 by construction.",
        "",
        "| layer | MoE | Engram | MoE - Engram |",
        "|---|---|---|---|",
    ]
    moe, eng = r["kl"][MOE], r["kl"][ENGRAM]
    for i, layer in enumerate(r["layers"]):
        lines.append(
            f"| {layer} | {moe['mean'][i]:.3f} ± {moe['std'][i]:.3f} | "
            f"{eng['mean'][i]:.3f} ± {eng['std'][i]:.3f} | {moe['mean'][i] - eng['mean'][i]:+.3f} |"
        )
    lines += [
        "",
        "Paper (§6.1, Engram-27B vs MoE-27B, 30 layers): the KL is lower for Engram, most in the "
        "early layers (Engram reaches 'prediction-ready' representations sooner).",
        "",
        verdict(r),
        "",
        "![LogitLens](img/results/logitlens/logitlens.png)",
    ]
    return "\n".join(lines)
