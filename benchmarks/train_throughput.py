"""What does Engram cost per training step, and where does that time go?

Two models on the same real batches (pydocs, byte-level BPE): a dense backbone (default 4
layers, D=256) and the same backbone with Engram at layer 1. Full training steps (forward,
backward, clipping, AdamW + SparseAdam for the tables, as ``engramlm.train`` does them) of the
two are interleaved, so machine noise hits both alike; tokens/s and their ratio come from the
median step times.

Then the Engram model's step is split into: hashing (``model.compute_hash_ids``), table lookup
(``table.lookup`` forward + backward), the rest of the Engram layer (projections, gates, short
conv; forward + backward), the table optimiser step (SparseAdam) and everything else. Hashing
and the optimiser are timed inside the step; the layer and its lookup are timed on the
step's own inputs (captured with a forward pre-hook), fwd+bwd in isolation, interleaved.
``engramlm.train`` hashes in the loader's background thread, so the ratio is also given with
hashing taken off the step.

``--baseline demo-moe`` races the two models of ``make demo`` instead (``engramlm.compare``:
the iso-parameter MoE and its Engram reallocation at rho = 0.75, the demo's batch and
sequence length), the ratio of issue 16's goal 5.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--threads N]
        [--baseline backbone|demo-moe] [--compile | --compile-race]

``--compile`` trains both through ``torch.compile(model)`` (the untimed warm-up steps compile).
``--compile-race`` instead races each model eager against itself compiled (same initial
weights, same batches, interleaved) and prints compiled / eager tokens/s: does compiling pay
for training here?
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, machine  # noqa: E402

from engramlm.config import EngramConfig, ModelConfig  # noqa: E402
from engramlm.data import Batch, TrainBatches, prepare_corpus  # noqa: E402
from engramlm.engram import Engram  # noqa: E402
from engramlm.model import EngramLM  # noqa: E402
from engramlm.tokenization import CompressedVocab  # noqa: E402
from engramlm.train import TrainConfig, _bind_vocab, build_optimizers  # noqa: E402


class Trainee:
    """A model, its optimisers and one timed training step (the loop body of ``train``)."""

    def __init__(
        self, config: ModelConfig, vocab: CompressedVocab, cfg: TrainConfig, compile: bool = False
    ) -> None:
        torch.manual_seed(cfg.seed)
        self.model = EngramLM(config, vocab if config.engram else None)
        self.model.train()
        self.forward = torch.compile(self.model) if compile else self.model
        self.optimizers = build_optimizers(self.model, cfg)
        self.dense = [p for p in self.model.dense_parameters() if p.requires_grad]
        self.cfg = cfg
        self.parts: dict[str, list[float]] = {"hashing": [], "table optimiser": []}

    def step(self, batch: Batch) -> float:
        """Seconds for one step, hashing included; records the hashing and table-optimiser parts."""
        t0 = time.perf_counter()
        hash_ids = self.model.compute_hash_ids(batch.input_ids) if self.model.hasher else None
        t1 = time.perf_counter()
        loss = self.forward(batch.input_ids, hash_ids=hash_ids, targets=batch.targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.dense, self.cfg.grad_clip, foreach=False)
        self.optimizers["dense"].step()
        t2 = time.perf_counter()
        if "tables" in self.optimizers:
            self.optimizers["tables"].step()
        t3 = time.perf_counter()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.model.update_moe_biases()
        t4 = time.perf_counter()
        self.parts["hashing"].append(t1 - t0)
        self.parts["table optimiser"].append(t3 - t2)
        return t4 - t0


def engram_layer_timers(model: EngramLM, batch: Batch) -> dict[str, Callable[[], object]]:
    """fwd+bwd of the (first) Engram layer and of its table lookup, on this batch's inputs."""
    block = next(b for b in model.layers if b.engram is not None)
    engram: Engram = block.engram  # type: ignore[assignment]
    captured: dict[str, torch.Tensor] = {}

    def capture(module: Engram, args: tuple[torch.Tensor, ...]) -> None:
        captured["hidden"], captured["hash_ids"] = args[0].detach(), args[1]

    handle = engram.register_forward_pre_hook(capture)
    with torch.no_grad():
        model(batch.input_ids)
    handle.remove()
    hidden = captured["hidden"].requires_grad_()  # [B, T, M, D]
    hash_ids = captured["hash_ids"]  # [B, T, H]
    rows = engram.global_rows(hash_ids)
    grad_y = torch.randn_like(hidden)
    grad_rows = torch.randn(*rows.shape, engram.table.dim)

    def layer() -> None:
        y, _ = engram(hidden, hash_ids)
        y.backward(grad_y)
        engram.zero_grad(set_to_none=True)

    def lookup() -> None:
        engram.table.lookup(rows).backward(grad_rows)
        engram.zero_grad(set_to_none=True)

    return {"engram layer": layer, "table lookup": lookup}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="pydocs")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--engram-layer", type=int, default=1)
    p.add_argument("--table-size", type=int, default=50_000, help="rows per head, pre-prime")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--baseline", choices=["backbone", "demo-moe"], default="backbone")
    p.add_argument("--compile", action="store_true", help="torch.compile both models' forward")
    p.add_argument(
        "--compile-race", action="store_true", help="each model eager against itself compiled"
    )
    args = p.parse_args()
    if args.compile and args.compile_race:
        p.error("--compile and --compile-race are exclusive: the race compiles one of each pair")
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus = prepare_corpus(args.data, vocab_size=args.vocab)
    D = args.hidden
    backbone = ModelConfig(
        vocab_size=corpus.vocab_size,
        num_layers=args.layers,
        hidden_size=D,
        num_heads=max(1, D // 64),
        num_kv_heads=max(1, D // 128),
        ffn_hidden_size=8 * D // 3,
        max_seq_len=args.seq,
    )
    engram_cfg = EngramConfig(
        table_sizes=(args.table_size, args.table_size),
        embed_dim_per_ngram=D,
        layer_ids=(args.engram_layer,),
        hc_mult=1,
    )
    cfg = TrainConfig(seq_len=args.seq, batch_size=args.batch)
    if args.baseline == "demo-moe":
        from engramlm.compare import (
            DEFAULT_ENGRAM,
            DEFAULT_MOE,
            DEFAULT_RHO,
            DEFAULT_TRAIN,
            build_models,
        )

        demo = build_models(DEFAULT_MOE, DEFAULT_ENGRAM, DEFAULT_RHO, corpus.vocab_size)
        backbone, with_engram = demo["MoE (rho=1)"], demo[f"Engram (rho={DEFAULT_RHO:g})"]
        cfg = dataclasses.replace(DEFAULT_TRAIN, steps=args.steps)
        args.seq, args.batch, args.layers = cfg.seq_len, cfg.batch_size, backbone.num_layers
        args.engram_layer, D = with_engram.engram.layer_ids[0], backbone.hidden_size
    else:
        with_engram = dataclasses.replace(backbone, engram=engram_cfg)
    # Bound to the corpus's tokenizer as engramlm.train does it (pad id, compressed vocabulary).
    backbone, with_engram = _bind_vocab(backbone, corpus), _bind_vocab(with_engram, corpus)
    engram_cfg = with_engram.engram
    configs = {"backbone": backbone, "engram": with_engram}
    if args.compile_race:
        models = {
            f"{name} {mode}": Trainee(config, corpus.compressed_vocab, cfg, mode == "compiled")
            for name, config in configs.items()
            for mode in ("eager", "compiled")
        }
    else:
        models = {
            name: Trainee(config, corpus.compressed_vocab, cfg, args.compile)
            for name, config in configs.items()
        }
    batches = TrainBatches(corpus.train, args.batch, args.seq, seed=0)
    step_times: dict[str, list[float]] = {name: [] for name in models}
    # compiled: the first steps compile, and recompile as shapes become dynamic
    warmup = 3 if args.compile or args.compile_race else 1
    for i in range(args.steps + warmup):  # the first steps of each are a warm-up
        batch = next(batches)
        for name, trainee in models.items():
            seconds = trainee.step(batch)
            if i >= warmup:
                step_times[name].append(seconds)
    load = os.getloadavg()[0]
    step = {name: statistics.median(t) for name, t in step_times.items()}
    tokens = args.batch * args.seq
    if args.compile_race:
        print(f"machine: {machine()}; load average {load:.1f} during the steps")
        print(f"train step B={args.batch} T={args.seq}, median of {args.steps} interleaved steps")
        for name in configs:
            eager, compiled = step[f"{name} eager"], step[f"{name} compiled"]
            print(
                f"  {name:9s} eager {tokens / eager:7,.0f} tok/s, compiled "
                f"{tokens / compiled:7,.0f} tok/s: compiled / eager {eager / compiled:.3f}x"
            )
        return
    engram = models["engram"]
    hashing = statistics.median(engram.parts["hashing"][warmup:])
    table_opt = statistics.median(engram.parts["table optimiser"][warmup:])
    iso = interleaved(engram_layer_timers(engram.model, batch), repeats=max(3, args.steps // 2))

    print(f"machine: {machine()}; load average {load:.1f} during the steps")
    if args.baseline == "demo-moe":
        print("make demo's models: 'backbone' is the iso-parameter MoE (rho=1)")
    table_params = sum(p.numel() for p in engram.model.engram_table_parameters())
    print(
        f"train step B={args.batch} T={args.seq} D={D} layers={args.layers} V={corpus.vocab_size}, "
        f"Engram at layer {args.engram_layer}: H={engram_cfg.num_heads}, "
        f"E={engram_cfg.memory_dim}, {table_params / 1e6:.1f}M table params; "
        f"median of {args.steps} interleaved steps"
    )
    for name in models:
        print(f"  {name:9s} {step[name] * 1e3:8.1f} ms/step  {tokens / step[name]:9,.0f} tok/s")
    ratio = step["backbone"] / step["engram"]
    off_step = step["backbone"] / (step["engram"] - hashing)
    print(
        f"  engram/backbone tokens/s: {ratio:.3f} (hashing in the step), "
        f"{off_step:.3f} (hashing off the step, as in train's prefetcher)"
    )
    rest = iso["engram layer"] - iso["table lookup"]
    shares = {
        "hashing (compute_hash_ids)": hashing,
        "table lookup fwd+bwd": iso["table lookup"],
        "rest of Engram layer fwd+bwd": rest,
        "table optimiser (SparseAdam)": table_opt,
    }
    shares["everything else"] = step["engram"] - sum(shares.values())
    print("Engram-model step time by part:")
    for name, sec in shares.items():
        print(f"  {name:30s} {sec * 1e3:8.2f} ms  {sec / step['engram']:6.1%}")


if __name__ == "__main__":
    main()
