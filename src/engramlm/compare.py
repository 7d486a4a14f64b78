"""The main job (``make demo``): does Engram beat an iso-parameter MoE on held-out real text?

Three models, same data, same steps, same seed, same batches:

- **MoE** - the reference, rho = 1: every sparse parameter in routed experts;
- **Engram** - ``allocate(MoE, rho)``: a share (1 - rho) of the sparse parameters moved from
  experts into Engram table rows, same total parameters, same top-k (SPEC §4, paper §3.1);
- **Dense** - the iso-FLOP dense model: one SwiGLU as wide as the MoE's activated experts.

Prints a table (params, activated params, FLOPs/token, tokens/s, validation loss, bits per
byte), writes ``results.json`` and a loss-curve plot under the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from engramlm.config import EngramConfig, ModelConfig
from engramlm.data import PreparedCorpus, prepare_corpus
from engramlm.model import allocate, model_stats
from engramlm.overrides import Schema, apply_overrides
from engramlm.train import TrainConfig, TrainResult, train

logger = logging.getLogger(__name__)

# The embedded default: sized so the three runs take ~11 minutes on 2 CPU cores.
DEFAULT_MOE = ModelConfig(
    vocab_size=8192,
    num_layers=4,
    hidden_size=256,
    num_heads=4,
    num_kv_heads=4,
    ffn_hidden_size=768,
    num_experts=16,
    experts_per_token=2,
    num_shared_experts=1,
    expert_hidden_size=256,
    first_dense_layers=1,
    max_seq_len=128,
)
# Engram at layer 1 (0-based; the paper's "layer 2"), 8 heads per order, 2- and 3-grams.
DEFAULT_ENGRAM = EngramConfig(
    table_sizes=(1009, 1009),  # replaced by allocate()
    heads_per_ngram=8,
    embed_dim_per_ngram=128,
    layer_ids=(1,),
    hc_mult=1,
)
DEFAULT_RHO = 0.75  # the paper's optimum is rho ~ 0.75-0.8
DEFAULT_TRAIN = TrainConfig(
    seq_len=128,
    batch_size=16,
    steps=300,
    lr=3e-3,
    warmup_steps=30,
    eval_every=100,
    eval_batches=40,
    log_every=10,
)
# What `engramlm compare --moe.hidden_size=512 --rho=0.5 --train.steps=600 ...` may override.
OVERRIDES: Schema = {"moe": ModelConfig, "engram": EngramConfig, "rho": float, "train": TrainConfig}


def dense_iso_flop(moe: ModelConfig) -> ModelConfig:
    """A dense model whose every FFN is as wide as the MoE's activated experts,
    (top-k + shared) x expert width; iso-FLOP exactly when the MoE's leading dense layers have
    that width too (as in the default). The routing fields go back to their defaults: they do
    nothing without experts, and a dense model is then stored once however they were set."""
    width = (moe.experts_per_token + moe.num_shared_experts) * moe.expert_hidden_size
    plain = ModelConfig()
    return dataclasses.replace(
        moe,
        num_experts=0,
        experts_per_token=0,
        num_shared_experts=0,
        expert_hidden_size=0,
        moe_bias_update_rate=plain.moe_bias_update_rate,
        moe_routed_scale=plain.moe_routed_scale,
        ffn_hidden_size=width,
        first_dense_layers=moe.num_layers,
    )


def dense_iso_param(moe: ModelConfig) -> ModelConfig:
    """A dense model whose every FFN is as wide as an MoE layer's experts all together,
    (routed + shared) x expert width: what the MoE's parameters buy as plain width, with no
    routing, at (experts + shared) / (top-k + shared) times its FFN FLOPs (its leading dense
    layers widen too, so it has a little more than the MoE's parameters). Not a bound on the
    MoE: at `recipes/moe_baseline.py`'s small-kernel-balanced the MoE beat it (docs)."""
    width = (moe.num_experts + moe.num_shared_experts) * moe.expert_hidden_size
    return dataclasses.replace(dense_iso_flop(moe), ffn_hidden_size=width)


def build_models(
    moe: ModelConfig, engram: EngramConfig, rho: float, vocab_size: int
) -> dict[str, ModelConfig]:
    moe = dataclasses.replace(moe, vocab_size=vocab_size)
    return {
        "MoE (rho=1)": moe,
        f"Engram (rho={rho:g})": allocate(moe, rho, engram=engram),
        "Dense (iso-FLOP)": dense_iso_flop(moe),
    }


def run_compare(
    out_dir: str = "runs/compare",
    steps: int | None = None,
    overrides: list[str] | None = None,
    *,
    corpus: PreparedCorpus | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the three models and print/write the comparison; returns the results dict."""
    tree = apply_overrides(
        {
            "moe": DEFAULT_MOE.to_dict(),
            "engram": DEFAULT_ENGRAM.to_dict(),
            "rho": DEFAULT_RHO,
            "train": DEFAULT_TRAIN.to_dict(),
        },
        overrides or [],
        OVERRIDES,
    )
    train_cfg = TrainConfig.from_dict(tree["train"])
    if steps is not None:
        train_cfg = dataclasses.replace(train_cfg, steps=steps)
    out = Path(out_dir)
    corpus = corpus or prepare_corpus(
        train_cfg.data,
        vocab_size=train_cfg.vocab_size,
        val_fraction=train_cfg.val_fraction,
        seed=train_cfg.seed,
    )
    models = build_models(
        ModelConfig.from_dict(tree["moe"]),
        EngramConfig.from_dict(tree["engram"]),
        float(tree["rho"]),
        corpus.vocab_size,
    )
    logger.info(
        "corpus %s: %s train tokens, %s val tokens, compressed vocab %d -> %d (%.1f%% smaller)",
        corpus.source,
        f"{corpus.train.num_tokens:,}",
        f"{corpus.val.num_tokens:,}",
        corpus.compressed_vocab.vocab_size,
        corpus.compressed_vocab.num_compressed,
        100 * corpus.compressed_vocab.ratio,
    )
    results: dict[str, TrainResult] = {}
    for i, (name, cfg) in enumerate(models.items()):
        logger.info("[%d/%d] %s\n%s", i + 1, len(models), name, model_stats(cfg).format())
        run_cfg = dataclasses.replace(train_cfg, out_dir=str(out / _slug(name)))
        results[name] = train(cfg, run_cfg, corpus=corpus, progress=progress)
    summary = _summarise(models, results, train_cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    table = format_table(summary)
    (out / "table.md").write_text(table + "\n")
    print(table)
    plot = _plot(results, out / "loss_curves.png")
    if plot:
        print(f"loss curves: {plot}")
    return summary


def _slug(name: str) -> str:
    return name.split(" ")[0].lower()


def _summarise(
    models: dict[str, ModelConfig], results: dict[str, TrainResult], cfg: TrainConfig
) -> dict[str, Any]:
    rows = []
    for name, model_cfg in models.items():
        stats = model_stats(model_cfg, seq_len=cfg.seq_len)
        r = results[name]
        rows.append(
            {
                "model": name,
                "total_params": stats.total_params,
                "non_embedding_params": stats.non_embedding_params,
                "active_params": stats.active_params,
                "engram_table_params": stats.engram_table_params,
                "flops_per_token": stats.flops_per_token,
                "tokens_per_s": r.tokens_per_s,
                "val_loss": r.val_loss,
                "val_bpb": r.val_bpb,
                "train_seconds": r.train_seconds,
                "out_dir": r.out_dir,
            }
        )
    return {"train": cfg.to_dict(), "rows": rows}


def format_table(summary: dict[str, Any]) -> str:
    """A Markdown table of the comparison."""
    head = (
        "| model | total params | non-emb. params | active params | Engram table | "
        "FLOPs/token | tokens/s | val loss | bits/byte |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in summary["rows"]:
        lines.append(
            f"| {r['model']} | {r['total_params'] / 1e6:.2f}M | "
            f"{r['non_embedding_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | "
            f"{r['engram_table_params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.1f}M | "
            f"{r['tokens_per_s']:,.0f} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |"
        )
    return "\n".join(lines)


def _plot(results: dict[str, TrainResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install 'engramlm[plots]')")
        return None
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [h["step"] for h in r.history]
        ax_train.plot(steps, [h["loss"] for h in r.history], label=name, lw=1)
        val = [(h["step"], h["val_loss"]) for h in r.history if "val_loss" in h]
        ax_val.plot([s for s, _ in val], [v for _, v in val], marker="o", label=name)
    ax_train.set(xlabel="step", ylabel="train loss (nats)", title="training loss")
    ax_val.set(xlabel="step", ylabel="validation loss (nats)", title="held-out loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
