"""What do sharded Engram tables cost on the wire, and what does deduplication save? (SPEC §5)

A small Engram model (``recipes/tiny.toml``'s, or ``--config``) trains on real text (pydocs,
byte-level BPE) with its tables sharded row-wise over 2 gloo ranks on the CPU, each rank
reading its own micro-batches as under ``torchrun`` (``engramlm.distributed``), and then as one
process (device tables, SparseAdam) on one rank's batch size. Every process uses one thread.

Per training step it prints:

- bytes the ranks sent each other for the tables (id counts, ids, rows, row gradients) as
  measured by the exchange, beside the analytic count from the step's own ids: per rank and
  lookup ``8 (W - 1)`` for the counts plus ``u_remote x (8 + 2 x 4 E_row)`` (an int64 id, then
  a float32 row back and a float32 row gradient out, for each distinct id another rank owns);
- the same count with every id sent (no deduplication, ``n_remote`` instead of ``u_remote``):
  what ``torch.unique`` before the exchange saves on real text;
- tokens/s of the two ranks together against the one process, measured in the same run
  (median step time after ``--warmup`` steps; each rank's batch = the one process's batch, so
  2.0 would be perfect scaling).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed.py [--steps 20] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from engramlm import distributed  # noqa: E402
from engramlm.config import ModelConfig  # noqa: E402
from engramlm.data import TrainBatches, prepare_corpus  # noqa: E402
from engramlm.model import EngramLM  # noqa: E402
from engramlm.train import TrainConfig, _bind_vocab, build_optimizers, lr_at, set_lr  # noqa: E402

WORLD = 2
ID_BYTES, VALUE_BYTES = 8, 4  # int64 ids, float32 rows and row gradients


def step_traffic(model: EngramLM, hash_ids: dict[int, torch.Tensor], rank: int, world: int):
    """(bytes with dedup, bytes without) this rank's lookups put on the wire in one step,
    counting each requested row (sent back by its owner) and its gradient to this rank."""
    with_dedup = without = 0
    for block in model.layers:
        if block.engram is None:
            continue
        table = block.engram.table
        rows = block.engram.global_rows(hash_ids[block.layer_id]).reshape(-1)
        per_id = ID_BYTES + 2 * table.dim * VALUE_BYTES
        remote = distributed.owner_of(rows, table.num_rows, world) != rank
        unique = torch.unique(rows)
        unique_remote = distributed.owner_of(unique, table.num_rows, world) != rank
        counts = (world - 1) * ID_BYTES
        with_dedup += counts + int(unique_remote.sum()) * per_id
        without += counts + int(remote.sum()) * per_id
    return with_dedup, without


def counters(model: EngramLM) -> list[int]:
    """[bytes sent, ids requested, distinct ids sent] of this rank's sharded tables so far."""
    tables = distributed.sharded_tables(model)
    return [sum(getattr(t, k) for t in tables) for k in ("bytes_sent", "ids_requested", "ids_sent")]


def run_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One process of the measurement; ``world`` 1 = one process with device tables."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    launch = distributed.launch_from_env()  # None for world 1
    corpus = prepare_corpus(args.data, vocab_size=args.vocab_size)
    fields = tomllib.loads(Path(args.config).read_text())["model"]
    fields.update(
        vocab_size=corpus.vocab_size,
        compressed_vocab_size=corpus.compressed_vocab.num_compressed,
        max_seq_len=max(fields.get("max_seq_len", 0), args.seq_len),
    )
    config = _bind_vocab(ModelConfig.from_dict(fields), corpus)  # V', the filler, as train does
    cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps)
    torch.manual_seed(0)
    if launch is None:
        model = net = EngramLM(config, corpus.compressed_vocab)
        optimizers = build_optimizers(model, cfg)
    else:
        model, net = distributed.build_model(config, corpus.compressed_vocab)
        optimizers = build_optimizers(model, cfg)
        tables = distributed.sharded_tables(model)
        optimizers["tables"] = distributed.table_optimizer(tables, lr=cfg.lr * cfg.table_lr_mult)
    stream = TrainBatches(corpus.train, args.batch_size, args.seq_len, seed=0)
    batches = distributed.RankBatches(stream, rank, world, model.compute_hash_ids)
    dense = [p for p in model.dense_parameters() if p.requires_grad]
    times, analytic, before = [], [0, 0], [0, 0, 0]
    for step in range(args.warmup + args.steps):
        batch = next(batches)
        if step == args.warmup:
            before = counters(model)
        t0 = time.perf_counter()
        set_lr(optimizers, lr_at(step, cfg), cfg)
        loss = net(batch.input_ids, hash_ids=batch.hash_ids, targets=batch.targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, cfg.grad_clip, foreach=False)
        for opt in optimizers.values():
            opt.step()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        if launch is not None:
            distributed.all_reduce_expert_counts(model)
        model.update_moe_biases()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            if launch is not None:
                traffic = step_traffic(model, batch.hash_ids, rank, world)
                analytic = [a + b for a, b in zip(analytic, traffic, strict=True)]
    result: dict[str, Any] = {"step_s": statistics.median(times)}
    if launch is not None:
        measured = [a - b for a, b in zip(counters(model), before, strict=True)]
        result["sums"] = launch.sum(*measured, *analytic)  # over ranks
        launch.close()
    torch.save(result, Path(out) / f"world{world}-rank{rank}.pt")


def spawn(world: int, args: argparse.Namespace, out: str) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(run_rank, args=(world, port, args, out), nprocs=world)
    return [torch.load(Path(out) / f"world{world}-rank{r}.pt") for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="recipes/tiny.toml", help="TOML with [model]")
    parser.add_argument("--data", default="pydocs")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank (and one process)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    print(
        f"model of {args.config}, {args.data}, {args.batch_size} x {args.seq_len} tokens per "
        f"rank, median of {args.steps} steps after {args.warmup}, 1 thread per process"
    )
    with tempfile.TemporaryDirectory() as out:
        (one,) = spawn(1, args, out)
        two = spawn(WORLD, args, out)
    sent, requested, distinct, analytic, undeduped = (x / args.steps for x in two[0]["sums"])
    print(f"table traffic per step, {WORLD} ranks together:")
    print(f"  measured by the exchange     {sent:12,.0f} B")
    print(f"  analytic, deduplicated ids   {analytic:12,.0f} B")
    print(f"  analytic, every id sent      {undeduped:12,.0f} B")
    print(f"  deduplication saves          {1 - analytic / undeduped:12.1%} of the bytes")
    print(f"  ids looked up -> distinct    {requested:,.0f} -> {distinct:,.0f} per step")
    tokens = args.batch_size * args.seq_len
    one_tps = tokens / one["step_s"]
    two_tps = WORLD * tokens / max(r["step_s"] for r in two)
    print(f"tokens/s: 1 process {one_tps:,.0f}, {WORLD} ranks {two_tps:,.0f}")
    print(f"ratio {WORLD} ranks / 1 process: {two_tps / one_tps:.2f}")


if __name__ == "__main__":
    main()
