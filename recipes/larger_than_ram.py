"""Train and generate with an Engram table whose training state is larger than this machine's RAM.

The table lives on the disk tier (memory-mapped files behind a hot-row cache with a fixed byte
budget); weights plus their two Adam moments take ``--table-gb`` x 3 of disk. The script builds
a small backbone with that table at layer 1, trains ``--steps`` steps on pydocs with the
tables' sparse Adam (only addressed rows and their moments are read and written), generates
greedily with the KV cache, and prints step times, tokens/s, the process's peak resident memory
and the machine's RAM, so anyone can see that the table is not bounded by RAM.

    .venv/bin/python recipes/larger_than_ram.py --dir /var/tmp/engram-big [--table-gb 9.6]

Needs ~3 x table-gb of free disk; the files are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from engramlm.config import EngramConfig, ModelConfig
from engramlm.data import TrainBatches, prepare_corpus
from engramlm.generate import generate_tokens
from engramlm.model import EngramLM, model_stats
from engramlm.tables import TablePlan
from engramlm.train import TrainConfig, _bind_vocab, build_optimizers, lr_at, set_lr


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` (``VmHWM``, ``VmRSS``) or ``/proc/meminfo`` field, in kB."""
    source = "/proc/meminfo" if field == "MemTotal" else "/proc/self/status"
    with open(source) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/var/tmp/engram-big", help="where the table files go")
    p.add_argument("--table-gb", type=float, default=9.6, help="fp32 weights; x3 with moments")
    p.add_argument("--cache-mb", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    head_dim, heads = 32, 8
    rows_per_head = int(args.table_gb * 1e9 / 4 / head_dim / (2 * heads))
    engram = EngramConfig(
        table_sizes=(rows_per_head, rows_per_head),
        heads_per_ngram=heads,
        embed_dim_per_ngram=heads * head_dim,
        layer_ids=(1,),
        hc_mult=1,
    )
    train_cfg = TrainConfig(seq_len=128, batch_size=8, steps=args.steps, warmup_steps=2)
    corpus = prepare_corpus(train_cfg.data, vocab_size=train_cfg.vocab_size)
    cfg = ModelConfig(
        vocab_size=corpus.vocab_size,
        num_layers=2,
        hidden_size=256,
        num_heads=4,
        num_kv_heads=4,
        ffn_hidden_size=768,
        max_seq_len=256,
        engram=engram,
    )
    cfg = _bind_vocab(cfg, corpus)  # V' and the n-gram filler, as train binds them
    stats = model_stats(cfg)
    state_gb = stats.engram_table_params * 4 * 3 / 1e9
    ram_gb = status_kb("MemTotal") * 1024 / 1e9
    print(
        f"Engram table: {stats.engram_table_params / 1e9:.2f}B params = "
        f"{stats.engram_table_params * 4 / 1e9:.1f} GB fp32; with Adam moments {state_gb:.1f} GB "
        f"on disk; this machine's RAM: {ram_gb:.1f} GB; row cache {args.cache_mb} MB x 3 stores",
        flush=True,
    )
    root = Path(args.dir)
    if root.exists():
        shutil.rmtree(root)
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        plan = TablePlan(kind="disk", path=str(root), cache_mb=args.cache_mb)
        model = EngramLM(cfg, corpus.compressed_vocab, tables=plan)
        print(f"built (tables initialised on disk) in {time.perf_counter() - t0:.0f} s", flush=True)

        optimizers = build_optimizers(model, train_cfg)
        batches = TrainBatches(
            corpus.train, train_cfg.batch_size, train_cfg.seq_len, hash_fn=model.compute_hash_ids
        )
        model.train()
        times, losses = [], []
        peak_anon = status_kb("RssAnon")
        for step in range(args.steps):
            t = time.perf_counter()
            set_lr(optimizers, lr_at(step, train_cfg), train_cfg)
            batch = next(batches)
            loss = model(batch.input_ids, hash_ids=batch.hash_ids, targets=batch.targets).loss
            loss.backward()
            for opt in optimizers.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
            peak_anon = max(peak_anon, status_kb("RssAnon"))
        tokens = train_cfg.batch_size * train_cfg.seq_len
        print(
            f"trained {args.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}, median step "
            f"{statistics.median(times):.2f} s ({tokens / statistics.median(times):,.0f} tok/s)",
            flush=True,
        )

        prompt = torch.tensor([corpus.tokenizer.encode("The list type").ids])
        t = time.perf_counter()
        out = list(generate_tokens(model, prompt, args.new_tokens, temperature=0))
        dt = time.perf_counter() - t
        text = corpus.tokenizer.decode([int(x[0]) for x in out])
        rate = args.new_tokens / dt
        print(f"generated {args.new_tokens} tokens in {dt:.1f} s ({rate:.1f} tok/s)")
        print(f"  'The list type' -> {text!r}")
        for table in model.engram_tables():
            print(f"  weight cache: {table.weight_store.stats()}")
        model.close_tables()
        on_disk = sum(f.stat().st_blocks * 512 for f in root.rglob("*") if f.is_file()) / 1e9
        print(
            f"process memory: anonymous (heap) peak {peak_anon / 1e6:.2f} GB during training, "
            f"now {status_kb('RssAnon') / 1e6:.2f} GB; file pages mapped now "
            f"{status_kb('RssFile') / 1e6:.2f} GB (page cache, reclaimable); peak RSS "
            f"{status_kb('VmHWM') / 1e6:.2f} GB; table files allocated on disk {on_disk:.1f} GB; "
            f"RAM {ram_gb:.1f} GB"
        )
    finally:
        if not args.keep and root.exists():
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
