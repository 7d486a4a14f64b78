"""Retrofit Engram into a small pretrained Llama and train only Engram (CPU, a few minutes).

    python recipes/retrofit_llama.py [--pretrain-steps 300] [--steps 150] [--out runs/retrofit]

1. A byte-level BPE trained on pydocs' training split (engramlm.data), wrapped as a
   ``PreTrainedTokenizerFast``; a 4-layer, 256-wide ``LlamaForCausalLM`` built from a
   ``LlamaConfig`` and pretrained on pydocs with a plain HF forward and AdamW.
2. (a) the base model's validation loss;
   (b) a copy retrofitted with Engram at layer 1 (0-based, the paper's layer 2), trained
       ``--steps`` steps with the base frozen (engramlm.retrofit.train_retrofit);
   (c) the base alone, fully fine-tuned for the same ``--steps`` steps, same batches and
       schedule - the honest baseline for "spend the same steps on the base instead".
Validation windows are the same held-out documents throughout. Prints the three losses and
writes them to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engramlm import EngramConfig, TrainBatches, ValBatches, prepare_corpus
from engramlm.data import EOS_TOKEN, PAD_TOKEN
from engramlm.retrofit import evaluate_lm, retrofit, save_retrofit, train_retrofit
from engramlm.train import TrainConfig, lr_at


def train_full(
    model: torch.nn.Module, batches: TrainBatches, steps: int, lr: float, warmup: int
) -> float:
    """Plain HF training of every parameter: AdamW, warmup + cosine; returns the last loss."""
    schedule = TrainConfig(lr=lr, steps=steps, warmup_steps=warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        batch = next(batches)
        logits = model(input_ids=batch.input_ids, use_cache=False).logits  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}/{steps}: train loss {loss.item():.4f}", flush=True)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150, help="Engram-only (and baseline) steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="pretraining peak LR")
    parser.add_argument("--engram-lr", type=float, default=2e-3, help="x5 for the tables")
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="(c)'s peak LR")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", default="runs/retrofit_llama")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    start = time.perf_counter()

    corpus = prepare_corpus("pydocs", vocab_size=args.vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=corpus.tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    config = LlamaConfig(
        vocab_size=corpus.vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=corpus.eos_id,
        eos_token_id=corpus.eos_id,
        pad_token_id=corpus.pad_id,
    )
    base = LlamaForCausalLM(config)
    val = ValBatches(corpus.val, args.batch_size, args.seq_len, max_batches=args.eval_batches)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"pretraining a {n_params / 1e6:.1f}M-parameter Llama for {args.pretrain_steps} steps")
    batches = TrainBatches(corpus.train, args.batch_size, args.seq_len, seed=0)
    train_full(base, batches, args.pretrain_steps, args.lr, warmup=30)
    loss_a = evaluate_lm(base, val, torch.device("cpu"))
    print(f"(a) base: val loss {loss_a:.4f}")

    engram = EngramConfig.preset(
        "tiny",
        layer_ids=(1,),
        table_sizes=(20011, 20011),
        embed_dim_per_ngram=128,
        pad_id=corpus.pad_id,
    )
    model = retrofit(copy.deepcopy(base), tokenizer, engram)
    report = train_retrofit(
        model,
        tokenizer,
        TrainConfig(
            data="pydocs",
            steps=args.steps,
            lr=args.engram_lr,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            warmup_steps=15,
            eval_batches=args.eval_batches,
            log_every=50,
            seed=1,  # the windows (c) trains on; the split is prepare_corpus's (split_seed=0)
        ),
    )
    save_retrofit(model, Path(args.out) / "engram")
    print(
        f"(b) + Engram at layer 1, {args.steps} Engram-only steps "
        f"({report['trainable_params'] / 1e6:.2f}M trainable): val loss "
        f"{report['val_loss_before']:.4f} -> {report['val_loss_after']:.4f}"
    )

    finetune = TrainBatches(corpus.train, args.batch_size, args.seq_len, seed=1)
    train_full(base, finetune, args.steps, args.finetune_lr, warmup=15)
    loss_c = evaluate_lm(base, val, torch.device("cpu"))
    print(f"(c) base, {args.steps} more full fine-tuning steps: val loss {loss_c:.4f}")

    results = {
        "base_val_loss": loss_a,
        "engram_val_loss_before": report["val_loss_before"],
        "engram_val_loss_after": report["val_loss_after"],
        "base_finetuned_val_loss": loss_c,
        "engram_trainable_params": report["trainable_params"],
        "base_params": n_params,
        "args": vars(args),
        "engram": engram.to_dict(),
        "seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"done in {results['seconds']:.0f} s -> {args.out}/results.json")


if __name__ == "__main__":
    main()
