"""Long context (paper §5, SPEC §4): RULER-style needle retrieval and variable tracking.

Two synthetic probes in the style of RULER (arXiv 2404.06654), hidden in real text from the
corpus (sizes in :class:`Sizes`):

- **Multi-query needle-in-a-haystack (MQ-NIAH)**: ``niah_needles`` sentences "The special magic
  number for <key> is: <7 digits>." at random places in the filler; then every key is asked
  for, in random order, each question followed by its answer.
- **Variable tracking (VT)**: ``vt_chains`` chains of ``vt_hops + 1`` variables ("VAR QWERT =
  52817", "VAR ZXCVB = VAR QWERT", ...) spread through the filler; the question asks for every
  variable holding one chain's value, the answer lists that chain's names in order. Deviation:
  RULER's default has one chain; with one chain the answer is every name in the text, so a
  second chain (a different value) makes the value matter.

A model of this size trained on documentation cannot do either zero-shot, so both models - the
MoE (rho = 1) and ``allocate(MoE, 0.75)`` Engram, the main job's pair with a longer context -
are trained on the same data: a stream that is ``probe_share`` probes (half each task, lengths
uniform in ``[probe_min, probe_max]``, filler from the *training* split) and otherwise whole
documents of the training split, read in random ``seq_len``-token windows. A probe is at most
half a window long, so every window drawn from the probe part holds at least one whole probe.

Evaluation: fresh probes (another seed: new keys, values and names, filler from the *held-out*
split) at each length in ``eval_lengths``, up to the full window - longer than any training
probe, a length-generalisation test. An answer item (one value, one variable name) counts as
exact when greedy decoding from the text before it reproduces its tokens: one forward with the
true prefix, every answer token the argmax (for greedy decoding the two are the same; later
items of a probe are scored after the true earlier ones). Accuracy is the share of exact items,
RULER's ``string_match_all`` averaged over probes, with the canonical tokenisation; the mean
negative log-likelihood of the answer tokens is reported beside it, as it moves before accuracy
does. The paper measures at 32k tokens; here the context is the training window (``seq_len``).
Default budget: 500 steps of 4 x 1024 tokens per model (~15 min each on 2 idle CPU cores).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from engramlm.compare import DEFAULT_RHO
from engramlm.config import ModelConfig
from engramlm.data import Document, PreparedCorpus, tokenize_to_file
from engramlm.experiments.common import Context
from engramlm.model import EngramLM, allocate, model_stats
from engramlm.train import TrainConfig, TrainResult

logger = logging.getLogger(__name__)

TASKS = ("mq_niah", "vt")
TASK_NAMES = {"mq_niah": "multi-query NIAH", "vt": "variable tracking"}
PAPER = {"context": 32768, "mq_niah": (84.2, 97.0), "vt": (77.0, 89.0)}  # MoE-27B, Engram-27B
TRAIN_PROBE_SEED, EVAL_PROBE_SEED = 1234, 5678

NIAH_NEEDLE = "\nThe special magic number for {key} is: {value}.\n"
NIAH_QUERY = "\nWhat is the special magic number for {key}? Answer:"
VT_FIRST = "\nVAR {name} = {value}\n"
VT_HOP = "\nVAR {name} = VAR {prev}\n"
VT_QUERY = "\nQuestion: Find all variables that are assigned the value {value}. Answer:"
ADJECTIVES = (
    "amber brave calm dusty eager faint gentle hollow icy jolly keen lively mellow narrow "
    "odd pale quiet rapid silent tidy upper vivid wild young zesty bold crisp damp early "
    "fuzzy grand humble"
).split()
NOUNS = (
    "anchor badger candle dragon engine falcon garden harbor island jacket kettle lantern "
    "meadow needle orchard pepper quarry river saddle tunnel umbrella valley walnut yacht "
    "zebra basket castle desert feather glacier hammer igloo"
).split()


@dataclass(frozen=True)
class Sizes:
    """Training window, steps and probe shapes."""

    seq_len: int = 1024
    batch_size: int = 4
    steps: int = 500
    probe_min: int = 256  # MQ-NIAH needles and questions alone take ~175 tokens
    probe_max: int = 500  # + its EOS <= (seq_len + 1) / 2: a whole probe in every window
    probe_share: float = 0.5  # of the training tokens
    eval_lengths: tuple[int, ...] = (256, 512, 1024)
    eval_probes: int = 100  # per task and length
    niah_needles: int = 4
    vt_chains: int = 2
    vt_hops: int = 4  # assignments after the first: hops + 1 variables per chain


DEFAULT_SIZES = Sizes()
SMOKE_SIZES = Sizes(  # the smoke tokenizer (512 ids) spends ~40 tokens on a needle
    seq_len=512,
    batch_size=2,
    steps=6,
    probe_min=200,
    probe_max=255,
    eval_lengths=(256, 512),
    eval_probes=3,
    niah_needles=2,
    vt_chains=2,
    vt_hops=1,
)


# --- probes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One probe: the whole text (filler, needles, questions and answers) and its answers.

    ``answers`` are the character spans ``[start, end)`` of the scored items in ``text``, in
    order; everything before an item is its prompt.
    """

    task: str
    text: str
    answers: tuple[tuple[int, int], ...]

    def answer_texts(self) -> list[str]:
        return [self.text[a:b] for a, b in self.answers]


class Filler:
    """Real text to hide needles in: random token windows of one split, EOS removed."""

    def __init__(self, tokens: np.ndarray, tokenizer: Tokenizer, eos_id: int) -> None:
        tokens = np.asarray(tokens)
        self.tokens = tokens[tokens != eos_id].astype(np.int64)
        self.tokenizer = tokenizer

    def starts(self, rng: np.random.Generator, count: int, longest: int) -> list[int]:
        high = self.tokens.shape[0] - longest
        if high < 1:
            raise ValueError(f"the filler split has {self.tokens.shape[0]} tokens, too few")
        return [int(s) for s in rng.integers(0, high, size=count)]

    def text(self, start: int, num_tokens: int) -> str:
        return self.tokenizer.decode(self.tokens[start : start + num_tokens].tolist())


def _distinct(rng: np.random.Generator, make: Any, count: int) -> list[Any]:
    out: list[Any] = []
    while len(out) < count:
        item = make()
        if item not in out:
            out.append(item)
    return out


def _niah_parts(rng: np.random.Generator, sizes: Sizes) -> tuple[list[str], list[str | tuple]]:
    keys = _distinct(
        rng, lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}", sizes.niah_needles
    )
    values = _distinct(rng, lambda: int(rng.integers(1_000_000, 10_000_000)), sizes.niah_needles)
    needles = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
    inserts = [needles[i] for i in rng.permutation(len(needles))]
    tail: list[str | tuple] = []
    for i in rng.permutation(len(keys)):
        tail += [NIAH_QUERY.format(key=keys[i]), (f" {values[i]}",), "\n"]
    return inserts, tail


def _vt_parts(rng: np.random.Generator, sizes: Sizes) -> tuple[list[str], list[str | tuple]]:
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    n_vars = sizes.vt_chains * (sizes.vt_hops + 1)
    names = _distinct(rng, lambda: "".join(rng.choice(letters, 5)), n_vars)
    values = _distinct(rng, lambda: int(rng.integers(10_000, 100_000)), sizes.vt_chains)
    chains = [
        names[c * (sizes.vt_hops + 1) : (c + 1) * (sizes.vt_hops + 1)] for c in range(len(values))
    ]
    statements = [
        [VT_FIRST.format(name=chain[0], value=value)]
        + [VT_HOP.format(name=chain[i], prev=chain[i - 1]) for i in range(1, len(chain))]
        for chain, value in zip(chains, values, strict=True)
    ]
    # Interleave the chains at random, each chain's statements in order.
    order = rng.permutation(np.repeat(np.arange(len(chains)), sizes.vt_hops + 1))
    nxt = [0] * len(chains)
    inserts = []
    for c in order:
        inserts.append(statements[c][nxt[c]])
        nxt[c] += 1
    asked = int(rng.integers(len(chains)))
    tail: list[str | tuple] = [VT_QUERY.format(value=values[asked])]
    tail += [(f" {name}",) for name in chains[asked]] + ["\n"]
    return inserts, tail


def make_probe(
    task: str, rng: np.random.Generator, filler: Filler, length: int, sizes: Sizes
) -> Probe:
    """A probe of at most ``length`` tokens (a few below at most: splices may merge tokens).

    Needles go at uniformly random places in filler drawn from ``filler``; questions and
    answers follow the haystack. Deterministic in the state of ``rng``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown probe task {task!r}; known: {TASKS}")
    inserts, tail = (_niah_parts if task == "mq_niah" else _vt_parts)(rng, sizes)
    tok = filler.tokenizer
    pieces = inserts + [p if isinstance(p, str) else p[0] for p in tail]
    fixed = sum(len(e.ids) for e in tok.encode_batch(pieces, add_special_tokens=False))
    budget = length - fixed
    if budget < len(inserts) + 1:
        raise ValueError(
            f"a {task} probe of {length} tokens leaves no room for filler: its needles and "
            f"questions alone take {fixed} tokens"
        )
    cuts = np.sort(rng.random(len(inserts)))  # needle positions, as fractions of the filler
    starts = filler.starts(rng, len(inserts) + 1, budget)
    for _ in range(8):
        bounds = [0, *(int(c * budget) for c in cuts), budget]
        text, answers = "", []
        for i, start in enumerate(starts):
            text += filler.text(start, bounds[i + 1] - bounds[i])
            if i < len(inserts):
                text += inserts[i]
        for piece in tail:
            if isinstance(piece, tuple):
                answers.append((len(text), len(text) + len(piece[0])))
                piece = piece[0]
            text += piece
        excess = len(tok.encode(text, add_special_tokens=False).ids) - length
        if excess <= 0:
            return Probe(task, text, tuple(answers))
        budget -= excess
    raise AssertionError(f"could not fit a {task} probe into {length} tokens")  # our invariant


def make_probes(
    task: str, count: int, filler: Filler, lengths: tuple[int, int], sizes: Sizes, seed: int
) -> list[Probe]:
    """``count`` probes, lengths uniform in ``lengths`` (inclusive), deterministic in ``seed``."""
    rng = np.random.default_rng([seed, TASKS.index(task)])
    return [
        make_probe(task, rng, filler, int(rng.integers(lengths[0], lengths[1] + 1)), sizes)
        for _ in range(count)
    ]


def solve(probe: Probe) -> list[str]:
    """A rule-based reader: the answer items, recovered from the text before each item.

    For the tests: proves the answers follow from the text (a model that reads perfectly can
    score 100%). Returns the items with their leading space, as in ``Probe.answers``.
    """
    import re

    prompt = probe.text[: probe.answers[0][0]]
    if probe.task == "mq_niah":
        numbers = dict(re.findall(r"The special magic number for (\S+) is: (\d+)\.", prompt))
        out = []
        for a, _ in probe.answers:
            key = re.findall(r"magic number for (\S+)\? Answer:$", probe.text[:a])[-1]
            out.append(f" {numbers[key]}")
        return out
    value = re.findall(r"assigned the value (\d+)\. Answer:$", prompt)[-1]
    holds = {name: v for name, v in re.findall(r"VAR ([A-Z]{5}) = (\d+)\n", prompt)}
    links = re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\n", prompt)
    found = [name for name, v in holds.items() if v == value]
    for name, prev in links:  # statements appear in chain order
        if prev in found:
            found.append(name)
    return [f" {name}" for name in found]


@dataclass(frozen=True)
class EncodedProbe:
    """A probe's token ids and the token span ``[i, j)`` of each answer item."""

    ids: list[int]
    spans: list[tuple[int, int]]


def encode_probe(probe: Probe, tokenizer: Tokenizer) -> EncodedProbe:
    """Token ids of the probe; each answer item must be whole tokens (the pre-tokenizer splits
    a leading-space number or word from its neighbours), checked here."""
    enc = tokenizer.encode(probe.text, add_special_tokens=False)
    spans = []
    for a, b in probe.answers:
        idx = [i for i, (s, e) in enumerate(enc.offsets) if s >= a and e <= b and e > s]
        if not idx or tokenizer.decode(enc.ids[idx[0] : idx[-1] + 1]) != probe.text[a:b]:
            raise ValueError(f"answer {probe.text[a:b]!r} is not a whole run of tokens")
        spans.append((idx[0], idx[-1] + 1))
    return EncodedProbe(list(enc.ids), spans)


@torch.no_grad()
def score(
    model: EngramLM, probes: list[EncodedProbe], pad_id: int, batch_size: int = 8
) -> dict[str, float]:
    """Exact-match accuracy of the answer items (greedy decoding from the true prefix) and the
    mean negative log-likelihood of their tokens (nats)."""
    model.eval()
    correct = items = 0
    nll, tokens = 0.0, 0
    for start in range(0, len(probes), batch_size):
        chunk = probes[start : start + batch_size]
        T = max(len(p.ids) for p in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.int64)
        for b, p in enumerate(chunk):
            ids[b, : len(p.ids)] = torch.tensor(p.ids)
        logits = model(ids).logits.float()  # [B, T, V]; right padding is never read (causal)
        logp = F.log_softmax(logits, dim=-1)
        pred = logits.argmax(dim=-1)  # [B, T]
        for b, p in enumerate(chunk):
            for i, j in p.spans:
                target = ids[b, i:j]
                correct += bool((pred[b, i - 1 : j - 1] == target).all())
                nll -= float(logp[b, i - 1 : j - 1].gather(-1, target[:, None]).sum())
                tokens += j - i
                items += 1
    return {"accuracy": correct / items, "answer_nll": nll / tokens, "items": items}


# --- training data ----------------------------------------------------------------------------


def mixed_corpus(ctx: Context, sizes: Sizes, steps: int) -> tuple[PreparedCorpus, dict[str, int]]:
    """The training split as real text plus probes, ``probe_share`` of the tokens the training
    windows will read (whole documents from the start of the training split, then the probes;
    windows are drawn uniformly, so the share holds in expectation); validation stays the
    corpus' held-out text. Returns the corpus and the token counts of both parts."""
    corpus = ctx.corpus
    budget = steps * sizes.batch_size * sizes.seq_len
    probe_tokens = int(sizes.probe_share * budget)
    text_tokens = max(budget - probe_tokens, sizes.seq_len + 1)
    train = np.asarray(corpus.train.tokens)
    eos = corpus.eos_id
    docs, used, begin = [], 0, 0
    for end in np.flatnonzero(train == eos).tolist() + [train.shape[0]]:
        if end > begin:
            docs.append(
                Document(f"text:{len(docs)}", corpus.tokenizer.decode(train[begin:end].tolist()))
            )
            used += end - begin + 1
        begin = end + 1
        if used >= text_tokens:
            break
    filler = Filler(train, corpus.tokenizer, eos)
    mean_len = (sizes.probe_min + sizes.probe_max) / 2
    per_task = max(1, math.ceil(probe_tokens / mean_len / len(TASKS)))
    span = (sizes.probe_min, sizes.probe_max)
    for task in TASKS:
        probes = make_probes(task, per_task, filler, span, sizes, TRAIN_PROBE_SEED)
        docs += [Document(f"{task}:{i}", p.text) for i, p in enumerate(probes)]
    key = hashlib.sha256(
        json.dumps([dataclasses.asdict(sizes), steps, corpus.train.content_hash]).encode()
    ).hexdigest()[:16]
    mix = tokenize_to_file(docs, corpus.tokenizer, ctx.out_dir / "data" / f"mix-{key}.bin")
    counts = {
        "text_tokens": used,
        "probe_tokens": mix.num_tokens - used,
        "probes": per_task * len(TASKS),
    }
    logger.info("longctx: training mixture %s (%s)", mix.path, counts)
    return dataclasses.replace(corpus, source=f"{corpus.source}+probes", train=mix), counts


# --- the experiment ---------------------------------------------------------------------------


def build_models(ctx: Context, sizes: Sizes) -> dict[str, ModelConfig]:
    moe = dataclasses.replace(
        ctx.base_moe, vocab_size=ctx.corpus.vocab_size, max_seq_len=sizes.seq_len
    )
    return {"moe": moe, "engram": allocate(moe, DEFAULT_RHO, engram=ctx.base_engram)}


@dataclasses.dataclass
class Plan:
    """What ``run`` trains: the models, their recipe and the context that trains on the mix."""

    sizes: Sizes
    steps: int
    train_ctx: Context  # ``ctx`` with the text + probes mixture provided for ``train_cfg``
    configs: dict[str, ModelConfig]
    train_cfg: TrainConfig
    mix_counts: dict[str, int]

    def train(self, kind: str, seed: int) -> TrainResult:
        """Train (or read back) the ``kind`` model ("moe" / "engram") of ``seed``."""
        cfg = dataclasses.replace(self.train_cfg, seed=seed)
        return self.train_ctx.train(f"{kind}-seed{seed}", self.configs[kind], cfg)


def plan(ctx: Context) -> Plan:
    """The training side of :func:`run`; a second process can call ``plan(ctx).train(...)`` on
    one of the models while ``run`` trains the other (stored runs are locked, so ``run`` then
    reads it back)."""
    sizes = SMOKE_SIZES if ctx.smoke else DEFAULT_SIZES
    steps = sizes.steps if ctx.smoke else max(1, round(sizes.steps * ctx.scale))
    mix, mix_counts = mixed_corpus(ctx, sizes, steps)
    train_ctx = dataclasses.replace(ctx)  # every run of this experiment trains on the mixture
    eval_every = max(1, steps // 2)
    base = ctx.train_config()
    train_cfg = ctx.train_config(
        data=f"{base.data}+longctx-probes:{mix.train.content_hash}",  # part of the run's digest
        seq_len=sizes.seq_len,
        batch_size=sizes.batch_size,
        steps=steps,
        warmup_steps=max(1, steps // 10),
        eval_every=eval_every,
        ckpt_every=eval_every,
        # As many held-out text tokens per evaluation as the base recipe's.
        eval_batches=max(
            2,
            base.eval_batches
            * base.batch_size
            * base.seq_len
            // (sizes.batch_size * sizes.seq_len),
        ),
    )
    train_ctx.provide_corpus(train_cfg.data, mix)
    return Plan(sizes, steps, train_ctx, build_models(ctx, sizes), train_cfg, mix_counts)


def run(ctx: Context) -> dict[str, Any]:
    """Train MoE and Engram on text + probes for each seed; score fresh probes per length."""
    p = plan(ctx)
    sizes, steps, configs, mix_counts = p.sizes, p.steps, p.configs, p.mix_counts

    corpus = ctx.corpus
    filler = Filler(np.asarray(corpus.val.tokens), corpus.tokenizer, corpus.eos_id)
    probes = {
        (task, L): [
            encode_probe(p, corpus.tokenizer)
            for p in make_probes(
                task, sizes.eval_probes, filler, (L, L), sizes, EVAL_PROBE_SEED + L
            )
        ]
        for task in TASKS
        for L in sizes.eval_lengths
    }
    models: dict[str, Any] = {}
    for kind, cfg in configs.items():
        per_seed = []
        for seed in ctx.seeds:
            key = f"{kind}-seed{seed}"
            result = p.train(kind, seed)
            model = ctx.load(key)
            logger.info("longctx: scoring %s on %d probes", key, sum(map(len, probes.values())))
            scores = {
                f"{task}@{L}": score(model, probes[task, L], corpus.eos_id)
                for task in TASKS
                for L in sizes.eval_lengths
            }
            per_seed.append({"seed": seed, "text_val_loss": result.val_loss, "scores": scores})
        stats = model_stats(cfg, seq_len=sizes.seq_len)
        models[kind] = {
            "total_params": stats.total_params,
            "active_params": stats.active_params,
            "engram_table_params": stats.engram_table_params,
            "num_experts": cfg.num_experts,
            "per_seed": per_seed,
            "cells": _cells(per_seed),
        }
    results = {
        "sizes": dataclasses.asdict(sizes),
        "steps": steps,
        "rho": DEFAULT_RHO,
        "train_tokens": steps * sizes.batch_size * sizes.seq_len,
        "mix": mix_counts,
        "models": models,
        "comparison": compare(models, sizes),
        "paper": PAPER,
    }
    _plot(ctx, results)
    return results


def _cells(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean (and min, max) over seeds of accuracy and answer NLL per task@length."""
    out = {}
    for cell in per_seed[0]["scores"]:
        acc = [s["scores"][cell]["accuracy"] for s in per_seed]
        nll = [s["scores"][cell]["answer_nll"] for s in per_seed]
        out[cell] = {
            "accuracy": statistics.fmean(acc),
            "accuracy_min": min(acc),
            "accuracy_max": max(acc),
            "answer_nll": statistics.fmean(nll),
            "items": sum(s["scores"][cell]["items"] for s in per_seed),
        }
    return out


def compare(models: dict[str, Any], sizes: Sizes) -> list[dict[str, Any]]:
    """Per task@length: Engram - MoE accuracy, its binomial standard error, and the call.

    The call is "engram" / "moe" when the difference exceeds two standard errors (items
    treated as independent), "tie" otherwise, and "floor" when both are below 5%.
    """
    rows = []
    for task in TASKS:
        for L in sizes.eval_lengths:
            cell = f"{task}@{L}"
            m, e = models["moe"]["cells"][cell], models["engram"]["cells"][cell]
            se = math.sqrt(sum(c["accuracy"] * (1 - c["accuracy"]) / c["items"] for c in (m, e)))
            diff = e["accuracy"] - m["accuracy"]
            if max(m["accuracy"], e["accuracy"]) < 0.05:
                call = "floor"
            elif abs(diff) > 2 * se:
                call = "engram" if diff > 0 else "moe"
            else:
                call = "tie"
            rows.append(
                {
                    "task": task,
                    "length": L,
                    "moe": m["accuracy"],
                    "engram": e["accuracy"],
                    "diff": diff,
                    "se": se,
                    "moe_nll": m["answer_nll"],
                    "engram_nll": e["answer_nll"],
                    "call": call,
                }
            )
    return rows


def _plot(ctx: Context, results: dict[str, Any]) -> None:
    """Accuracy (top) and answer NLL (bottom) vs probe length, per task, both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    fig, axes = plt.subplots(2, len(TASKS), figsize=(10, 7), sharex=True, sharey="row")
    for col, task in enumerate(TASKS):
        lengths = [r["length"] for r in results["comparison"] if r["task"] == task]
        for kind, style in (("moe", "o-"), ("engram", "s-")):
            cells = [results["models"][kind]["cells"][f"{task}@{L}"] for L in lengths]
            label = "MoE (rho=1)" if kind == "moe" else f"Engram (rho={results['rho']:g})"
            acc = axes[0, col]
            acc.plot(lengths, [100 * c["accuracy"] for c in cells], style, label=label)
            lo = [100 * c["accuracy_min"] for c in cells]
            acc.fill_between(lengths, lo, [100 * c["accuracy_max"] for c in cells], alpha=0.2)
            axes[1, col].plot(lengths, [c["answer_nll"] for c in cells], style, label=label)
        paper = results["paper"][task]
        axes[0, col].set_title(f"{TASK_NAMES[task]} (paper @32k: {paper[0]} -> {paper[1]})")
        axes[0, col].set_ylim(-3, 103)
        axes[1, col].set_xlabel("probe length (tokens)")
        for ax in axes[:, col]:
            ax.axvline(
                sizes["probe_max"], color="grey", ls=":", lw=1, label="longest training probe"
            )
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(lengths, [str(L) for L in lengths])
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("exact-match accuracy (%)")
    axes[1, 0].set_ylabel("answer NLL (nats/token)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    ctx.savefig(fig, "longctx_accuracy")


def report(doc: dict[str, Any]) -> str:
    """The markdown section for docs/results.md, verdict computed from the numbers."""
    res = doc["results"]
    sizes = res["sizes"]
    minutes = doc["wall_seconds"] / 60
    moe, engram = res["models"]["moe"], res["models"]["engram"]
    mix = res["mix"]
    total = mix["probe_tokens"] + mix["text_tokens"]

    def losses(kind: str) -> str:
        vals = [s["text_val_loss"] for s in res["models"][kind]["per_seed"]]
        return f"{statistics.fmean(vals):.4f}"

    lines = [
        "## Long context (`engramlm experiment longctx`)",
        "",
        f"Command: `{doc['command']}` (scale {doc['scale']:g}, seeds {doc['seeds']}, "
        f"{res['steps']} steps of {sizes['batch_size']} x {sizes['seq_len']} tokens per model). "
        f"Machine: {doc['machine']}. Wall time: {minutes:.1f} min.",
        "",
        f"Both models - MoE (rho = 1, {moe['total_params'] / 1e6:.2f}M parameters) and Engram "
        f"(allocate(MoE, {res['rho']:g}), {engram['total_params'] / 1e6:.2f}M, "
        f"{engram['engram_table_params'] / 1e6:.2f}M in the table) - trained on the same "
        f"{res['train_tokens'] / 1e6:.2f}M tokens in {sizes['seq_len']}-token windows, drawn "
        f"from a stream that is {100 * mix['probe_tokens'] / total:.0f}% RULER-style probes "
        f"({mix['probes']:,}, half each task, {sizes['probe_min']}-{sizes['probe_max']} tokens, "
        "filler from the training split) and the rest documentation. Held-out text loss after "
        "training: MoE "
        f"{losses('moe')}, Engram {losses('engram')}. Evaluation: {sizes['eval_probes']} fresh "
        "probes per task and length (new keys, values and names; filler from the held-out split); "
        f"MQ-NIAH hides {sizes['niah_needles']} needles and asks for all; VT has "
        f"{sizes['vt_chains']} chains of {sizes['vt_hops'] + 1} variables and asks for one. "
        "Accuracy: share of answer items greedy decoding reproduces exactly; NLL: mean nats per "
        "answer token; call: who is ahead by more than two binomial standard errors (items "
        "counted as independent), *floor* when both are below 5%.",
        "",
        "| task | length | MoE acc. | Engram acc. | Engram - MoE (± 1 SE) | MoE NLL | Engram NLL "
        "| call |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["comparison"]:
        lines.append(
            f"| {TASK_NAMES[r['task']]} | {r['length']} | {100 * r['moe']:.1f}% | "
            f"{100 * r['engram']:.1f}% | {100 * r['diff']:+.1f} ± {100 * r['se']:.1f} | "
            f"{r['moe_nll']:.3f} | {r['engram_nll']:.3f} | {r['call']} |"
        )
    paper = res["paper"]
    lines += [
        "",
        f"Paper (§5, {paper['context'] // 1024}k context): "
        f"multi-query NIAH {paper['mq_niah'][0]} -> {paper['mq_niah'][1]}, variable tracking "
        f"{paper['vt'][0]} -> {paper['vt'][1]} (MoE-27B -> Engram-27B).",
        "",
        "![long-context accuracy](img/results/longctx/longctx_accuracy.png)",
        "",
        "**Verdict:** " + verdict(res),
    ]
    return "\n".join(lines) + "\n"


def verdict(res: dict[str, Any]) -> str:
    """Per task: where Engram is ahead, behind or level beyond two standard errors."""
    parts = []
    for task in TASKS:
        rows = [r for r in res["comparison"] if r["task"] == task]
        calls = {
            c: [str(r["length"]) for r in rows if r["call"] == c]
            for c in ("engram", "moe", "tie", "floor")
        }
        longest = rows[-1]
        if len(calls["floor"]) == len(rows):
            text = "neither model learned it (both below 5% at every length): not testable here"
        elif calls["engram"] and not calls["moe"]:
            text = (
                f"Engram ahead beyond 2 SE at lengths {', '.join(calls['engram'])} and never "
                "behind: the paper's direction reproduced"
            )
        elif calls["moe"] and not calls["engram"]:
            text = (
                f"MoE ahead beyond 2 SE at lengths {', '.join(calls['moe'])}: the paper's "
                "direction not reproduced"
            )
        elif calls["moe"] and calls["engram"]:
            text = (
                f"mixed: Engram ahead at {', '.join(calls['engram'])}, MoE ahead at "
                f"{', '.join(calls['moe'])}: not reproduced"
            )
        else:
            text = "no difference beyond 2 SE at any length: not reproduced (a tie)"
        parts.append(
            f"{TASK_NAMES[task]}: {text} (at {longest['length']} tokens, MoE -> Engram: "
            f"accuracy {100 * longest['moe']:.1f}% -> {100 * longest['engram']:.1f}%, answer "
            f"NLL {longest['moe_nll']:.3f} -> {longest['engram_nll']:.3f})."
        )
    return " ".join(parts)
