"""Gate activations (the paper's gating visualisation; SPEC §2.5): where the memory opens.

The context-aware gate alpha_t = sigmoid(ssqrt(RMSNorm(h_t) . RMSNorm(W_K e_t) / sqrt(D)))
decides how much of the retrieved n-gram memory enters the residual stream at token t. The paper
shows it firing on multi-token named entities and formulaic phrases (its running example: "Diana,
Princess of Wales") and staying low elsewhere; it gives pictures, no number. We read it from the
Engram model of the shared pair (:mod:`engramlm.experiments.pair`):

- **heatmaps** over ``SENTENCES``, short texts in the corpus' domain (Python docs) written for
  this experiment, each holding multi-token names or fixed phrases (``collections.OrderedDict``,
  ``Guido van Rossum``, ``the Python Software Foundation``, ``ValueError``); one row per
  residual branch (``hc_mult``);
- **a number**, on every token of the first held-out validation windows: the mean gate on
  *continuation pieces* of multi-token words (non-initial BPE pieces, the tokens whose 2-/3-gram
  key spells a piece of a longer name) against *word-initial* pieces and other tokens
  (punctuation, whitespace); see :func:`~engramlm.experiments.pair.continuation_mask`.

The gate is recomputed inside a forward hook on each ``Engram`` module from the inputs the
module received (``Engram.gates``, the code its forward uses), so it is the gate the forward
used; ``test_recorded_gates_reproduce_engram_output`` checks that alpha * W_V e_t
plus the short conv of it equals the module's output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from engramlm.engram import Engram
from engramlm.experiments.common import Context
from engramlm.experiments.pair import (
    ENGRAM,
    batches,
    continuation_mask,
    device_of,
    header,
    heldout_windows,
    mean_std,
    pm,
    trained_pairs,
)
from engramlm.model import EngramLM

logger = logging.getLogger(__name__)

NUM_WINDOWS = 64  # held-out windows for the token-class means (8,192 tokens by default)
SMOKE_WINDOWS = 4
SENTENCES = (
    "The collections.OrderedDict class remembers the order in which keys were first inserted.",
    "Python was created by Guido van Rossum and is developed by the Python Software Foundation.",
    "If an argument has the right type but an inappropriate value, ValueError is raised.",
    "Use os.path.join() to build file paths and json.dumps() to serialize an object.",
    "The global interpreter lock lets only one thread execute Python bytecode at a time.",
    "PyObject_GetAttrString() returns a new reference, or NULL with an exception set.",
    "The asyncio.get_event_loop() function returns the current event loop.",
    "A UnicodeDecodeError is raised when the bytes are not valid UTF-8.",
)
CLASSES = ("continuation", "word_initial", "other")


@contextlib.contextmanager
def record_gates(model: EngramLM) -> Iterator[dict[int, Tensor]]:
    """{1-based block: gates [B, T, M]} of the latest forward, read by hooks on each Engram."""
    gates: dict[int, Tensor] = {}
    handles = []
    for block in model.layers:
        if block.engram is None:
            continue

        def hook(module: Engram, args: tuple, output: Any, layer: int = block.layer_id + 1) -> None:
            hidden, hash_ids = args[0], args[1]
            gates[layer] = module.gates(hidden, hash_ids).detach()

        handles.append(block.engram.register_forward_hook(hook))
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def sentence_gates(model: EngramLM, tokenizer: Any) -> list[dict[str, Any]]:
    """Per sentence: its tokens (text) and gates {block: [M][T]} of every Engram layer."""
    out = []
    for text in SENTENCES:
        ids = tokenizer.encode(text).ids[: model.config.max_seq_len]
        with record_gates(model) as gates:
            model(torch.tensor([ids], device=device_of(model)))
        out.append(
            {
                "text": text,
                "tokens": [tokenizer.decode([i]) for i in ids],
                "gates": {str(k): g[0].T.tolist() for k, g in gates.items()},  # [M][T]
            }
        )
    return out


@torch.no_grad()
def class_means(model: EngramLM, ids: Tensor, tokenizer: Any) -> dict[str, dict[str, float]]:
    """{block: {class: mean gate, "effect_size": d}} over all tokens of ``ids`` [W, T] and all
    branches; ``effect_size`` is Cohen's d of continuation vs word-initial gates (difference
    of means over the pooled per-token standard deviation)."""
    cont, initial = continuation_mask(ids, tokenizer)
    masks = {"continuation": cont, "word_initial": initial, "other": ~(cont | initial)}
    sums: dict[str, dict[str, float]] = {}
    squares: dict[str, dict[str, float]] = {}
    device = device_of(model)
    chunks = zip(batches(ids, device), *(batches(m, device) for m in masks.values()), strict=True)
    for chunk, *chunk_masks in chunks:
        with record_gates(model) as gates:
            model(chunk)
            for layer, g in gates.items():  # [B, T, M]
                acc = sums.setdefault(str(layer), {})
                sq = squares.setdefault(str(layer), {})
                for name, m in zip(masks, chunk_masks, strict=True):  # m: [B, T]
                    acc[name] = acc.get(name, 0.0) + float(g[m].double().sum())
                    sq[name] = sq.get(name, 0.0) + float(g[m].double().square().sum())
    counts = {name: int(mask.sum()) * model.config.hc_mult for name, mask in masks.items()}
    out = {}
    for layer, acc in sums.items():
        means = {name: acc[name] / max(counts[name], 1) for name in CLASSES}
        var = {
            name: max(squares[layer][name] / max(counts[name], 1) - means[name] ** 2, 0.0)
            for name in ("continuation", "word_initial")
        }
        pooled = math.sqrt((var["continuation"] + var["word_initial"]) / 2)
        diff = means["continuation"] - means["word_initial"]
        out[layer] = {**means, "effect_size": diff / pooled if pooled > 0 else 0.0}
    return out


def run(ctx: Context) -> dict[str, Any]:
    pairs = trained_pairs(ctx)
    tokenizer = pairs.corpus.tokenizer
    ids, _ = heldout_windows(
        pairs.corpus, pairs.seq_len, SMOKE_WINDOWS if ctx.smoke else NUM_WINDOWS
    )
    cont, initial = continuation_mask(ids, tokenizer)
    per_seed = []
    for pair in pairs.pairs:
        means = class_means(pair.models[ENGRAM], ids, tokenizer)
        per_seed.append(means)
        logger.info("gates seed %d: %s", pair.seed, means)
    layers = sorted(per_seed[0], key=int)
    stats = {
        layer: {
            **{c: mean_std([s[layer][c] for s in per_seed]) for c in CLASSES},
            "difference": mean_std(
                [s[layer]["continuation"] - s[layer]["word_initial"] for s in per_seed]
            ),
            "effect_size": mean_std([s[layer]["effect_size"] for s in per_seed]),
            "per_seed": [s[layer] for s in per_seed],
        }
        for layer in layers
    }
    first = pairs.pairs[0].models[ENGRAM]
    results = {
        "pair": pairs.summary(),
        "tokens": ids.numel(),
        "token_counts": {
            "continuation": int(cont.sum()),
            "word_initial": int(initial.sum()),
            "other": int((~(cont | initial)).sum()),
        },
        "class_means": stats,
        "sentences_seed": pairs.pairs[0].seed,
        "sentences": sentence_gates(first, tokenizer),
    }
    plot_sentences(ctx, results)
    plot_classes(ctx, results)
    return results


def plot_sentences(ctx: Context, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sentences = results["sentences"]
    layers = sorted(sentences[0]["gates"], key=int)
    rows = [(s, layer) for s in sentences for layer in layers]
    widest = max(len(s["tokens"]) for s in sentences)
    branches = len(sentences[0]["gates"][layers[0]])
    fig, axes = plt.subplots(
        len(rows),
        1,
        figsize=(max(6, 0.32 * widest + 2), (0.25 * branches + 1.0) * len(rows) + 0.6),
        layout="constrained",
        squeeze=False,
    )
    for ax, (s, layer) in zip(axes[:, 0], rows, strict=True):
        im = ax.imshow(s["gates"][layer], vmin=0, vmax=1, cmap="magma", aspect="auto")
        labels = [t.replace(" ", "·").replace("\n", "⏎") for t in s["tokens"]]
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_xlim(-0.5, widest - 0.5)  # equal cell widths across sentences
        ax.set_yticks(
            range(branches), [f"block {layer} m={m}" for m in range(branches)], fontsize=7
        )
    fig.colorbar(im, ax=axes, shrink=0.6, label="gate alpha_t")
    fig.suptitle(
        f"Engram gate over sentences (seed {results['sentences_seed']}; · = leading space)"
    )
    ctx.savefig(fig, "gate_heatmaps")


def plot_classes(ctx: Context, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    layers = sorted(results["class_means"], key=int)
    width = 0.8 / len(layers)
    for i, layer in enumerate(layers):
        stats = results["class_means"][layer]
        xs = [c + i * width for c in range(len(CLASSES))]
        ax.bar(
            xs,
            [stats[c]["mean"] for c in CLASSES],
            width,
            yerr=[stats[c]["std"] for c in CLASSES],
            capsize=3,
            label=f"Engram block {layer}",
        )
    counts = results["token_counts"]
    ax.set_xticks(
        [c + 0.4 - width / 2 for c in range(len(CLASSES))],
        [f"{c.replace('_', '-')}\n({counts[c]:,} tokens)" for c in CLASSES],
    )
    ax.set(ylabel="mean gate alpha_t", ylim=(0, 1), title="gate by token class (held-out)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    ctx.savefig(fig, "gate_by_class")


SMALL_EFFECT = 0.2  # Cohen's d below this is a negligible difference (Cohen's convention)


def verdict(results: dict[str, Any]) -> str:
    """A sentence computed from the numbers: does the gate open more inside multi-token words?

    Reproduced in a block when continuation pieces have the higher mean gate in every seed
    *and* the effect is at least small (Cohen's d >= 0.2); a higher mean with a smaller effect
    is reported as negligible, not as a reproduction.
    """
    parts, opened, direction = [], [], []
    for layer, stats in sorted(results["class_means"].items(), key=lambda kv: int(kv[0])):
        diffs = [s["continuation"] - s["word_initial"] for s in stats["per_seed"]]
        sizes = [s.get("effect_size", 0.0) for s in stats["per_seed"]]
        up = sum(d > 0 for d in diffs)
        direction.append(up == len(diffs))
        opened.append(up == len(diffs) and min(sizes) >= SMALL_EFFECT)
        parts.append(
            f"block {layer}: continuation {stats['continuation']['mean']:.3f} vs word-initial "
            f"{stats['word_initial']['mean']:.3f} (difference {pm(stats['difference'])}, "
            f"Cohen's d {statistics.fmean(sizes):+.2f}, higher in {up} of {len(diffs)} seeds)"
        )
    if all(opened):
        head = "**Reproduced**: the gate is clearly higher on continuation pieces of words"
    elif any(opened):
        head = "**Partly reproduced**: the gate is clearly higher on continuation pieces in some"
        head += " blocks"
    elif all(direction):
        head = (
            "**Not reproduced**: continuation pieces get a higher gate, but the difference is "
            f"negligible (Cohen's d < {SMALL_EFFECT})"
        )
    else:
        head = "**Not reproduced**: the gate is not higher on continuation pieces of words"
    saturated = [
        layer
        for layer, stats in results["class_means"].items()
        if min(stats[c]["mean"] for c in CLASSES) >= 0.9
    ]
    note = (
        f"; in block {', '.join(sorted(saturated, key=int))} the gate is open (>= 0.9) on "
        "every token class, so at this size it barely selects"
        if saturated
        else ""
    )
    return f"{head} ({'; '.join(parts)}){note}."


def report(doc: dict[str, Any]) -> str:
    r = doc["results"]
    lines = header(doc, "Gate activations over real text")
    counts = r["token_counts"]
    lines += [
        f"Mean gate alpha_t on {r['tokens']:,} held-out tokens by class (mean ± std over seeds): "
        "*continuation* = non-initial BPE piece of a multi-token word (identifier characters), "
        "*word-initial* = the first piece of a word, *other* = punctuation, whitespace, symbols.",
        "",
        "| Engram block | continuation | word-initial | other | continuation - word-initial |",
        "|---|---|---|---|---|",
    ]
    for layer, s in sorted(r["class_means"].items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"| {layer} | {pm(s['continuation'])} | {pm(s['word_initial'])} | {pm(s['other'])} "
            f"| {pm(s['difference'], '+.3f')} |"
        )
    lines += [
        f"| tokens | {counts['continuation']:,} | {counts['word_initial']:,} | "
        f"{counts['other']:,} | |",
        "",
        f"Most-opened tokens per sentence (seed {r['sentences_seed']}, first Engram block, "
        "mean over branches):",
        "",
    ]
    for s in r["sentences"]:
        layer = sorted(s["gates"], key=int)[0]
        branches = s["gates"][layer]
        mean = [sum(col) / len(col) for col in zip(*branches, strict=True)]
        top = sorted(range(len(mean)), key=lambda t: mean[t], reverse=True)[:3]
        picks = ", ".join(
            f"`{s['tokens'][t].strip() or repr(s['tokens'][t])}` {mean[t]:.2f}" for t in top
        )
        lines.append(f"- {s['text']} -> {picks}")
    lines += [
        "",
        "Paper (gating visualisation): the gate fires on multi-token named entities and "
        "formulaic phrases and stays low on other tokens; it shows pictures, no single number.",
        "",
        verdict(r),
        "",
        "![gate heatmaps](img/results/gates/gate_heatmaps.png)",
        "![gate by token class](img/results/gates/gate_by_class.png)",
    ]
    return "\n".join(lines)
