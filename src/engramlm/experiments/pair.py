"""The trained pair the mechanism experiments analyse: the main job's MoE and Engram models.

``logitlens``, ``cka``, ``gates`` and ``masking`` (paper §6.1, §6.3; SPEC §4 "Mechanism",
"Sensitivity") all read the same two models per seed: the pure MoE (rho = 1) and its
iso-parameter Engram variant (``allocate(MoE, 0.75)``), built exactly as ``engramlm.compare``
builds them from ``ctx.base_moe`` / ``ctx.base_engram``. They are trained once, under the shared
folder ``<out_root>/_pair/models/{moe,engram}-seed<s>`` (a sibling :class:`Context` named
``_pair`` with the same scale, smoke, seeds, device and data), so whichever of the four runs
first trains them and the others read them back.

Also here, because all four use them: held-out windows of the validation split, the residual
stream after every block (read with forward hooks, streams merged by their mean as the model does
before its final norm), the token classes "word-initial piece" / "continuation piece" of a
multi-token word, and the header every report starts with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from engramlm.compare import DEFAULT_RHO, build_models
from engramlm.data import PreparedCorpus
from engramlm.experiments.common import Context
from engramlm.model import EngramLM, model_stats
from engramlm.train import TrainResult

PAIR_NAME = "_pair"  # the shared folder under out_root
MOE, ENGRAM = "moe", "engram"
LABELS = {MOE: "MoE (rho=1)", ENGRAM: f"Engram (rho={DEFAULT_RHO:g})"}
EVAL_BATCH = 16  # windows per forward when analysing
# A piece of a word: identifier characters only, optionally after one leading space (byte-level
# BPE marks a word start with a space). Dotted names ("collections.OrderedDict") are two words.
_WORD_PIECE = re.compile(r"^ ?[A-Za-z0-9_]+$")


@dataclass
class Pair:
    """One seed's trained MoE and Engram models (eval mode) and their training results."""

    seed: int
    models: dict[str, EngramLM]  # {"moe": ..., "engram": ...}
    results: dict[str, TrainResult]


@dataclass
class TrainedPairs:
    """The pair for every seed of the context, with the corpus they were trained on."""

    corpus: PreparedCorpus
    seq_len: int  # training window length; analyses use windows of this length
    pairs: list[Pair]
    trained_here: bool  # whether this call trained (part of) a run, rather than reading it back

    def summary(self) -> dict[str, Any]:
        """Parameters and validation loss of both models, per seed (for every results.json)."""
        first = self.pairs[0].models
        out: dict[str, Any] = {
            "rho": DEFAULT_RHO,
            "seq_len": self.seq_len,
            "trained_here": self.trained_here,
        }
        for key, model in first.items():
            stats = model_stats(model.config, seq_len=self.seq_len)
            out[key] = {
                "label": LABELS[key],
                "total_params": stats.total_params,
                "active_params": stats.active_params,
                "engram_table_params": stats.engram_table_params,
                "num_experts": model.config.num_experts,
                "val_loss": [p.results[key].val_loss for p in self.pairs],
            }
        return out


def pair_context(ctx: Context) -> Context:
    """The sibling context whose ``models/`` folder holds the shared pair."""
    return dataclasses.replace(ctx, name=PAIR_NAME)


def trained_pairs(ctx: Context) -> TrainedPairs:
    """Train (or read back) the MoE and Engram models for every seed of ``ctx``; load them."""
    pctx = pair_context(ctx)
    corpus = pctx.corpus
    configs = build_models(pctx.base_moe, pctx.base_engram, DEFAULT_RHO, corpus.vocab_size)
    moe_cfg, engram_cfg = configs[LABELS[MOE]], configs[LABELS[ENGRAM]]
    pairs, trained_here = [], False
    for seed in ctx.seeds:
        train_cfg = pctx.train_config(seed=seed)
        results, models = {}, {}
        for key, cfg in ((MOE, moe_cfg), (ENGRAM, engram_cfg)):
            results[key] = pctx.train(f"{key}-seed{seed}", cfg, train_cfg)
            finished = pctx.out_dir / "models" / f"{key}-seed{seed}" / "result.json"
            trained_here |= finished.stat().st_mtime >= ctx.started
            models[key] = pctx.load(f"{key}-seed{seed}")
        pairs.append(Pair(seed=seed, models=models, results=results))
    return TrainedPairs(
        corpus=corpus,
        seq_len=pctx.train_config().seq_len,
        pairs=pairs,
        trained_here=trained_here,
    )


# --- held-out text --------------------------------------------------------------------------


def heldout_windows(
    corpus: PreparedCorpus, seq_len: int, num_windows: int
) -> tuple[Tensor, Tensor]:
    """The first ``num_windows`` non-overlapping windows of the validation split.

    Returns (inputs, targets), [W, T] int64 each, targets shifted by one token; the same windows
    ``ValBatches`` scores, so every analysis reads the same held-out text.
    """
    tokens = np.asarray(corpus.val.tokens, dtype=np.int64)
    available = (tokens.shape[0] - 1) // seq_len
    W = min(num_windows, available)
    if W < 1:
        raise ValueError(f"the validation split has no window of {seq_len} tokens")
    flat = torch.from_numpy(tokens[: W * seq_len + 1].copy())
    return flat[:-1].view(W, seq_len), flat[1:].view(W, seq_len)


def batches(
    x: Tensor, device: torch.device | str = "cpu", size: int = EVAL_BATCH
) -> Iterator[Tensor]:
    """[W, ...] -> chunks of at most ``size`` windows, on ``device``."""
    for start in range(0, x.shape[0], size):
        yield x[start : start + size].to(device)


def device_of(model: EngramLM) -> torch.device:
    """Where the model's weights live (inputs go there)."""
    return next(model.parameters()).device


# --- the residual stream after each block ---------------------------------------------------


@contextlib.contextmanager
def block_outputs(model: EngramLM) -> Iterator[list[Tensor]]:
    """Record the residual stream after every block of each forward, [B, T, D] per block.

    Streams of a multi-branch model are merged by their mean, as ``EngramLM.forward`` does
    before ``final_norm``. The list is cleared at the start of each forward.
    """
    outputs: list[Tensor] = []

    def clear(module: torch.nn.Module, args: tuple) -> None:
        outputs.clear()

    def record(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        outputs.append(output.mean(dim=2))  # [B, T, M, D] -> [B, T, D]

    handles = [model.register_forward_pre_hook(clear)]
    handles += [block.register_forward_hook(record) for block in model.layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def engram_layers(model: EngramLM) -> list[int]:
    """1-based numbers of the blocks holding Engram (the paper counts layers from 1)."""
    return [block.layer_id + 1 for block in model.layers if block.engram is not None]


# --- token classes --------------------------------------------------------------------------


def word_piece_table(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Per token id: (is a word piece, starts with a space), [V] bool each."""
    V = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = [tokenizer.decode([i]) for i in range(V)]
    piece = np.array([bool(_WORD_PIECE.match(s)) for s in texts])
    space = np.array([s.startswith(" ") for s in texts])
    return piece, space


def continuation_mask(ids: Tensor, tokenizer: Tokenizer) -> tuple[Tensor, Tensor]:
    """[W, T] ids -> (continuation, word_initial), [W, T] bool each.

    A *word* is a maximal run of identifier characters ``[A-Za-z0-9_]`` (so ``OrderedDict``,
    ``Py_complex``, ``van``). A token is a *continuation piece* when it and the token before it
    are word pieces and it does not start with a space: a non-initial sub-word piece of a
    multi-token word (``Py`` ``_complex``: ``_complex`` continues). Word pieces that do not
    continue are *word-initial*. The first token of a window counts as word-initial (its left
    context is cut off).
    """
    piece, space = (torch.from_numpy(a) for a in word_piece_table(tokenizer))
    is_piece = piece[ids]
    cont = torch.zeros_like(is_piece)
    cont[:, 1:] = is_piece[:, 1:] & ~space[ids[:, 1:]] & is_piece[:, :-1]
    return cont, is_piece & ~cont


def word_final_mask(ids: Tensor, tokenizer: Tokenizer) -> Tensor:
    """[W, T] -> [W, T] bool: the last token of each multi-token word (a continuation piece not
    followed by another one); the last token of a window is excluded (the word may go on)."""
    cont, _ = continuation_mask(ids, tokenizer)
    final = cont.clone()
    final[:, :-1] &= ~cont[:, 1:]
    final[:, -1] = False
    return final


# --- numbers and reports --------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation over seeds (std 0 for one seed)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std}


def layerwise(per_seed: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """[seeds][layers] -> {"mean": [layers], "std": [layers]}."""
    cols = [mean_std(col) for col in zip(*per_seed, strict=True)]
    return {"mean": [c["mean"] for c in cols], "std": [c["std"] for c in cols]}


def command(doc: dict[str, Any]) -> str:
    """The command that reproduces ``doc``: ``engramlm experiment NAME`` and its options."""
    parts = ["engramlm", "experiment", doc["experiment"]]
    if doc.get("scale", 1.0) != 1.0:
        parts += ["--scale", f"{doc['scale']:g}"]
    if list(doc.get("seeds", [0])) != [0]:
        parts += ["--seeds", ",".join(str(s) for s in doc["seeds"])]
    if doc.get("smoke"):
        parts.append("--smoke")
    return " ".join(parts)


def header(doc: dict[str, Any], title: str) -> list[str]:
    """The lines every section starts with: heading, command, machine, wall time, the pair."""
    pair = doc["results"]["pair"]
    seeds = doc.get("seeds", [0])
    losses = ", ".join(
        f"{pair[k]['label']} {mean_std(pair[k]['val_loss'])['mean']:.3f}" for k in (MOE, ENGRAM)
    )
    return [
        f"## {title} (`engramlm experiment {doc['experiment']}`)",
        "",
        f"- command: `{command(doc)}`",
        f"- machine: {doc['machine']}",
        f"- wall time: {doc['wall_seconds'] / 60:.1f} min "
        + (
            "(including training the shared pair)"
            if pair.get("trained_here")
            else "(the shared pair read back, trained earlier)"
        ),
        f"- models: the main job's pair, seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}; "
        f"{pair[MOE]['label']} {pair[MOE]['num_experts']} experts vs {pair[ENGRAM]['label']} "
        f"{pair[ENGRAM]['num_experts']} experts + {pair[ENGRAM]['engram_table_params'] / 1e6:.2f}M "
        f"table params; held-out loss {losses}",
        "",
    ]


def pm(stat: dict[str, float], fmt: str = ".3f") -> str:
    """'mean ± std' of a :func:`mean_std` dict."""
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt.lstrip('+')}}"
