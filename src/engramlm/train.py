"""Training: the loop, the two optimisers, the schedule, evaluation and exact resume.

Dense parameters train with AdamW (decoupled weight decay on matrices only). Engram tables
train with lazy Adam at ``table_lr_mult`` (5, SPEC §3) times the base learning rate and no
weight decay - ``torch.optim.SparseAdam``, or its bitwise twin ``TableAdam`` for tables kept in
host memory or on disk (``table_storage``, SPEC §5): each step touches only the rows the batch
addressed and only their Adam moments (lazy Adam - rows not addressed keep their moments,
which a dense Adam would decay). The schedule is linear warmup then cosine to
``min_lr_ratio``. Gradient clipping applies to the dense parameters; table rows are not clipped
(their gradients are sparse and per-row; the paper does not say and clipping them jointly would
couple unrelated rows).

A run directory holds ``config.json`` (the resolved configs), ``metrics.jsonl`` and
``checkpoints/``; with ``tensorboard=True`` also ``tensorboard/``, the same rows as TensorBoard
scalars (the ``tb`` extra). ``resume=True`` continues from the last good checkpoint so that
the loss curve equals the uninterrupted run's bit for bit (fp32 on CPU): model, optimiser, RNG
and data position are all restored, and the schedule is a pure function of the step. Disk
tables live in ``<out_dir>/tables/``; each checkpoint holds a snapshot of their files
(``engramlm.checkpoint``), and a resume rebuilds the live files from it, so they resume
exactly too.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains data-parallel with the Engram
tables sharded row-wise across the ranks (``engramlm.distributed``, SPEC §5): ``batch_size`` is
per rank and per micro-batch, so one step consumes ``batch_size x grad_accum x world`` windows,
the same windows, in the same order, as one process with ``grad_accum x world`` micro-batches,
and its losses equal that run's. Rank 0 alone logs and writes the run's files; checkpoints are
sharded (every rank writes its rows) and load into any world size, one process included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from engramlm.checkpoint import (
    check_compatible,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from engramlm.config import ModelConfig, check_fields
from engramlm.data import (
    EOS_TOKEN,
    PAD_TOKEN,
    HashFn,
    Prefetcher,
    PreparedCorpus,
    TrainBatches,
    ValBatches,
    prepare_corpus,
)
from engramlm.model import EngramLM
from engramlm.tables import DeviceTable, OffloadedTable, TableAdam, TablePlan
from engramlm.tables.plan import TableKind
from engramlm.tokenization import resolve_pad_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: data, batch shape, optimiser, schedule, evaluation, checkpoints."""

    data: str = "pydocs"  # named corpus (pydocs, stdlib, zh-fortunes) or a file/folder/.jsonl
    vocab_size: int = 8192  # byte-level BPE trained on the training split
    val_fraction: float = 0.05  # share of the documents held out for validation
    seq_len: int = 256  # tokens per training window
    batch_size: int = 16  # windows per step (per process under torchrun)
    grad_accum: int = 1  # micro-batches per optimiser step
    steps: int = 1000  # optimiser steps
    lr: float = 3e-3  # peak learning rate (AdamW for the dense weights)
    table_lr_mult: float = 5.0  # SPEC §3: Engram embeddings at 5x the base LR, Adam, no wd
    warmup_steps: int = 50  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.1  # AdamW, dense weights only
    grad_clip: float = 1.0  # max gradient norm of the dense weights
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16 = autocast
    eval_every: int = 100  # steps between validations (0: only at the end)
    eval_batches: int = 20  # validation batches per evaluation
    ckpt_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # steps between metrics.jsonl rows
    seed: int = 0  # initial weights, data order and split
    out_dir: str = "runs/train"  # the run folder: configs, checkpoints, metrics
    table_storage: Literal["device", "host", "disk"] = "device"  # SPEC §5; see tables.plan
    table_cache_mb: int = 256  # disk tier: row cache per table (files: <out_dir>/tables/)
    dense_parallel: Literal["ddp", "fsdp"] = "ddp"  # torchrun: the dense part (tables sharded)
    tensorboard: bool = False  # metrics.jsonl's rows also as TensorBoard scalars (engramlm[tb])
    # On the 2-core CPU of docs/benchmarks.md compiling bought 1.04-1.07x tokens/s for ~1 min.
    compile: bool = False  # torch.compile the training forward (one process): for long runs
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": trace, no kernels)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "seq_len", "batch_size", "grad_accum", "steps", "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "log_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.table_lr_mult <= 0:
            raise ValueError(
                f"lr and table_lr_mult must be > 0, got {self.lr}, {self.table_lr_mult}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _ = self.table_plan  # validates table_storage and table_cache_mb
        for name in ("tensorboard", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.compile:  # only then: listing the backends imports torch._dynamo (~1.5 s)
            backends = torch.compiler.list_backends(exclude_tags=())
            if self.compile_backend not in backends:
                raise ValueError(
                    f"compile_backend {self.compile_backend!r} is not a torch.compile backend; "
                    f"known: {sorted(backends)}"
                )
        if self.dense_parallel not in ("ddp", "fsdp"):
            raise ValueError(f"dense_parallel must be 'ddp' or 'fsdp', got {self.dense_parallel!r}")

    @property
    def table_plan(self) -> TablePlan:
        """Where the Engram tables live; disk tables under ``<out_dir>/tables/``."""
        try:
            return TablePlan(
                kind=self.table_storage,
                path=str(Path(self.out_dir) / "tables") if self.table_storage == "disk" else None,
                cache_mb=self.table_cache_mb,
            )
        except ValueError as e:
            raise ValueError(f"table_storage/table_cache_mb: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        check_fields(cls, d)
        return cls(**d)


@dataclass
class TrainResult:
    """What a run produced; also written to ``<out_dir>/result.json``."""

    out_dir: str
    steps: int
    tokens: int
    val_loss: float
    val_bpb: float
    tokens_per_s: float
    train_seconds: float
    history: list[dict[str, float]]
    expert_load: list[list[float]] | None = None
    # torch's intra-op threads in the training process (results reproduce bit for bit only at
    # the same count); None in results written before it was recorded.
    threads: int | None = None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine down to ``lr * min_lr_ratio`` at ``steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


Optimizer = torch.optim.Optimizer | TableAdam


def build_optimizers(model: EngramLM, cfg: TrainConfig) -> dict[str, Optimizer]:
    """AdamW for dense parameters (no decay on vectors); lazy Adam for the Engram tables under
    the key ``"tables"``: SparseAdam for device tables, :class:`TableAdam` (the same
    arithmetic, SPEC §5) for host and disk tables.

    Switches the model's in-memory tables to sparse gradients, which SparseAdam requires: only
    the addressed rows and their moments are then touched by a step.
    """
    for module in model.modules():
        if isinstance(module, DeviceTable):
            module.sparse_grad = True
    decay, no_decay = [], []
    for p in model.dense_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    optimizers: dict[str, Optimizer] = {
        "dense": torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.95),
            eps=1e-8,
            foreach=False,  # same arithmetic whatever the grouping: exact resume
        )
    }
    lr, betas, eps = cfg.lr * cfg.table_lr_mult, (0.9, 0.95), 1e-8
    offloaded = [t for t in model.engram_tables() if isinstance(t, OffloadedTable)]
    tables = [p for p in model.engram_table_parameters() if p.requires_grad]
    if offloaded and tables:
        raise ValueError(
            f"{len(offloaded)} offloaded and {len(tables)} in-memory Engram tables: one "
            "'tables' optimiser needs one kind; build the model from a single TablePlan"
        )
    if offloaded:
        optimizers["tables"] = TableAdam(offloaded, lr=lr, betas=betas, eps=eps)
    elif tables:
        optimizers["tables"] = torch.optim.SparseAdam(tables, lr=lr, betas=betas, eps=eps)
    return optimizers


def set_lr(optimizers: dict[str, Optimizer], lr: float, cfg: TrainConfig) -> None:
    for name, opt in optimizers.items():
        for group in opt.param_groups:
            group["lr"] = lr * (cfg.table_lr_mult if name == "tables" else 1.0)


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_hasher(model: EngramLM) -> HashFn:
    """What the data loader applies to each batch: ``model.compute_hash_ids``, followed, when
    a table keeps its rows in files, by ``model.warm_tables`` on the result. The loader runs a
    batch or two ahead of the step (:class:`Prefetcher`), so the disk starts reading a batch's
    missed rows while the steps before it compute, not at its lookup (SPEC §5)."""
    if not any(isinstance(t, OffloadedTable) and t.has_files for t in model.engram_tables()):
        return model.compute_hash_ids

    def hash_and_warm(input_ids: Tensor) -> dict[int, Tensor]:  # [B, T] -> {layer: [B, T, H]}
        hash_ids = model.compute_hash_ids(input_ids)
        model.warm_tables(hash_ids)
        return hash_ids

    return hash_and_warm


@torch.no_grad()
def evaluate(
    model: EngramLM,
    batches: ValBatches,
    cfg: TrainConfig,
    device: torch.device,
    launch: Any = None,
) -> float:
    """Token-weighted mean cross-entropy (nats) over the validation windows; with a
    ``distributed.Launch``, each rank scores its share and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # One process: the next batches are hashed (and disk tables warmed) while this one runs.
    with contextlib.nullcontext(batches) if launch else Prefetcher(batches) as ahead:
        for batch, counted in launch.share(batches) if launch else ((b, True) for b in ahead):
            batch = batch.to(device)
            with _autocast(cfg, device):
                out = model(batch.input_ids, hash_ids=batch.hash_ids, targets=batch.targets)
            n = batch.targets.numel() if counted else 0
            total += float(out.loss) * n
            count += n
    if launch is not None:
        total, count = launch.sum(total, count)
    model.train(was_training)
    if count == 0:
        raise ValueError("validation split produced no windows; lower seq_len or eval size")
    return total / count


class MetricsLog:
    """Append-only JSONL; on resume, rows past the resumed step are dropped first. Without a
    ``path`` (ranks other than 0) the rows are only kept in memory. With a ``tensorboard``
    folder, every number of every row is also a TensorBoard scalar at the row's step (events
    past the resumed step purged, like the JSONL rows)."""

    def __init__(
        self, path: Path | None, resume_step: int | None, tensorboard: Path | None = None
    ) -> None:
        self.path = path
        self.board = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(tensorboard), purge_step=resume_step)
        rows: list[dict[str, Any]] = []
        if path is None:
            pass
        elif resume_step is not None and path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r["step"] <= resume_step]
        elif path.exists():
            path.unlink()
        self.rows = rows
        if path is not None:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.board.add_scalar(key, value, row["step"])
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def check_tensorboard() -> None:
    """An ``ImportError`` saying how to install TensorBoard when it is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ImportError(
            "train.tensorboard=true needs the tensorboard package: pip install 'engramlm[tb]' "
            "(or set --train.tensorboard=false)"
        ) from None


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    """The progress bar's numbers: validation loss only once there has been an evaluation."""
    shown = {"loss": f"{row['loss']:.3f}"}
    if math.isfinite(row.get("val_loss", math.nan)):
        shown["val"] = f"{row['val_loss']:.3f}"
    shown["tok_s"] = f"{row['tokens_per_s']:.0f}"
    return shown


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    corpus: PreparedCorpus | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train a model on real text and return its validation loss; see the module docstring."""
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"train.seq_len={cfg.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}; "
            "lower seq_len or raise max_seq_len"
        )
    if cfg.tensorboard:
        check_tensorboard()  # before any work
    device = torch.device(device)
    launch = None  # one process; under torchrun, this rank's place (engramlm.distributed)
    if cfg.compile and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "train.compile=true is supported in one process only (under torchrun the sharded "
            "tables' row exchange is untested compiled); leave it off under torchrun"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from engramlm import distributed

        launch = distributed.launch_from_env(device)
        device = launch.device
    main = launch is None or launch.is_main
    with launch.main_first() if launch else contextlib.nullcontext():  # rank 0 fills the cache
        corpus = corpus or prepare_corpus(
            cfg.data, vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction, seed=cfg.seed
        )
    model_cfg = _bind_vocab(model_cfg, corpus)  # refuses a bad filler before writing anything
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = {
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "tokenizer_fingerprint": corpus.compressed_vocab.fingerprint,
        # The experiments split once (seed 0) for every training seed: kept for `evaluate_run`.
        "split": {"seed": corpus.split_seed, "tuning": corpus.tuning},
    }

    tables_dir = cfg.table_plan.path
    with launch.main_first() if launch else contextlib.nullcontext():
        if main and tables_dir is not None and Path(tables_dir).exists():
            # The live files hold the rows of the last step written, not of any checkpoint: a
            # resume rebuilds them and rolls them back to the checkpoint's snapshot.
            why = "resuming from a checkpoint's snapshot" if resume else "starting from scratch"
            logger.warning("%s: removing the live disk tables in %s", why, tables_dir)
            shutil.rmtree(tables_dir)
    torch.manual_seed(cfg.seed)
    vocab = corpus.compressed_vocab if model_cfg.engram else None
    if launch is None:
        model = net = EngramLM(model_cfg, vocab, tables=cfg.table_plan).to(device)
    else:
        plan = distributed.ParallelPlan(dense=cfg.dense_parallel, tables=cfg.table_plan)
        model, net = distributed.build_model(model_cfg, vocab, plan, device=device)
    world = 1 if launch is None else launch.world
    if cfg.compile:
        # The forward only: checkpoints, evaluation and the optimisers keep the plain model.
        # The tables' sparse-gradient lookups run eagerly between graphs (DeviceTable).
        net = torch.compile(model, backend=cfg.compile_backend)
    try:
        optimizers = build_optimizers(model, cfg)
        if launch is not None and distributed.sharded_tables(model):
            optimizers["tables"] = distributed.table_optimizer(
                distributed.sharded_tables(model), lr=cfg.lr * cfg.table_lr_mult
            )
        train_batches = TrainBatches(
            corpus.train,
            cfg.batch_size,
            cfg.seq_len,
            seed=cfg.seed,
            hash_fn=batch_hasher(model) if launch is None else None,
        )
        val_batches = ValBatches(
            corpus.val,
            cfg.batch_size,
            cfg.seq_len,
            max_batches=cfg.eval_batches,
            hash_fn=batch_hasher(model),
        )

        start_step, tokens_seen, train_seconds = 0, 0, 0.0
        ckpt = find_latest_checkpoint(out) if resume else None
        if resume and ckpt is None:
            logger.warning("--resume: no checkpoint under %s, starting from scratch", out)
        if ckpt is not None:
            saved = (
                json.loads((out / "config.json").read_text())
                if (out / "config.json").exists()
                else {}
            )
            if saved:
                check_compatible(saved.get("model", {}), configs["model"], what="model config")
                check_compatible(
                    {"fingerprint": saved.get("tokenizer_fingerprint")},
                    {"fingerprint": configs["tokenizer_fingerprint"]},
                    what="tokenizer",
                )
            # The run directory, not ``ckpt``: falls back past checkpoints that fail verification.
            load = load_checkpoint if launch is None else distributed.load_checkpoint
            state = load(out, model=model, optimizers=optimizers, map_location=device)
            start_step, tokens_seen = int(state["step"]), int(state["tokens"])
            train_seconds = float(state.get("train_seconds", 0.0))
            train_batches.load_state_dict(state["data"])
            logger.info("resumed from %s at step %d", state["path"], start_step)
        if main:
            (out / "config.json").write_text(json.dumps(configs, indent=2))
            corpus.tokenizer.save(str(out / "tokenizer.json"))
            corpus.compressed_vocab.save(out / "compressed_vocab.json")
        metrics = MetricsLog(
            out / "metrics.jsonl" if main else None,
            start_step if ckpt is not None else None,
            out / "tensorboard" if main and cfg.tensorboard else None,
        )

        def save(step: int) -> None:
            (save_checkpoint if launch is None else distributed.save_checkpoint)(
                out,
                step,
                model=model,
                optimizers=optimizers,
                trainer_state={
                    "step": step,
                    "tokens": tokens_seen,
                    "train_seconds": train_seconds,
                    "data": stream.state_dict(),
                },
                config=configs,
                tokenizer_fingerprint=corpus.compressed_vocab.fingerprint,
                keep=cfg.keep_checkpoints,
            )

        model.train()
        dense_params = [p for p in model.dense_parameters() if p.requires_grad]
        val_loss = float("nan")
        last_load: list[list[float]] | None = None
        bar = _progress(cfg.steps, start_step, progress and main)
        stream = Prefetcher(
            train_batches
            if launch is None
            else distributed.RankBatches(
                train_batches, launch.rank, launch.world, batch_hasher(model)
            ),
            depth=2,
        )
        try:
            for step in range(start_step, cfg.steps):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                set_lr(optimizers, lr, cfg)
                loss_sum = 0.0
                for micro in range(cfg.grad_accum):
                    batch = next(stream).to(device)
                    sync = contextlib.nullcontext()  # ranks sync dense gradients once per step
                    if launch is not None:
                        sync = distributed.gradient_sync(net, micro + 1 == cfg.grad_accum)
                    with sync:
                        with _autocast(cfg, device):
                            loss = net(
                                batch.input_ids, hash_ids=batch.hash_ids, targets=batch.targets
                            ).loss
                        (loss / cfg.grad_accum).backward()
                    loss_sum += float(loss.detach())
                    tokens_seen += batch.input_ids.numel() * world
                norm = torch.nn.utils.clip_grad_norm_(dense_params, cfg.grad_clip, foreach=False)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                for opt in optimizers.values():
                    opt.step()
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                if launch is not None:  # the bias update sees the global batch's loads
                    distributed.all_reduce_expert_counts(model)
                    loss_sum = launch.sum(loss_sum)[0] / world
                loads = model.update_moe_biases()
                if loads:
                    last_load = [v.tolist() for v in loads.values()]
                dt = time.perf_counter() - t0
                train_seconds += dt
                step_tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
                row: dict[str, Any] = {
                    "step": step + 1,
                    "loss": loss_sum / cfg.grad_accum,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens_seen,
                    "tokens_per_s": step_tokens / dt,
                    "time": train_seconds,
                }
                if loads:  # routing balance: the busiest expert's load over the mean, worst layer
                    row["busiest_expert"] = max(
                        float(v.max() / v.float().mean().clamp_min(1e-9)) for v in loads.values()
                    )
                last = step + 1 == cfg.steps
                if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                    val_loss = evaluate(model, val_batches, cfg, device, launch)
                    row["val_loss"] = val_loss
                    row["val_bpb"] = corpus.val.bits_per_byte(val_loss)
                if (step + 1) % max(1, cfg.log_every) == 0 or "val_loss" in row or last:
                    metrics.write(row)
                bar.set_postfix(_postfix({**row, "val_loss": val_loss}), refresh=False)
                bar.update(1)
                if (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or last:
                    save(step + 1)
        finally:
            stream.close()
            bar.close()
            metrics.close()

        if start_step >= cfg.steps:  # resumed a finished run: evaluate what is there
            val_loss = evaluate(model, val_batches, cfg, device, launch)
        result = TrainResult(
            out_dir=str(out),
            steps=cfg.steps,
            tokens=tokens_seen,
            val_loss=val_loss,
            val_bpb=corpus.val.bits_per_byte(val_loss),
            tokens_per_s=tokens_seen / train_seconds if train_seconds else float("nan"),
            train_seconds=train_seconds,
            history=metrics.rows,
            expert_load=last_load,
            threads=torch.get_num_threads(),
        )
    finally:
        model.close_tables()  # disk tables: flushed, checksummed, unlocked
        if launch is not None:
            launch.close()
    if main:
        (out / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return result


def _bind_vocab(model_cfg: ModelConfig, corpus: PreparedCorpus) -> ModelConfig:
    """The model's vocabulary is the tokenizer's; V' is the compressed vocabulary's; the n-gram
    filler (``pad_id``) of Engram and Over-Encoding is resolved and checked against the
    tokenizer (its pad token unless set; SPEC §2.2)."""
    compressed = corpus.compressed_vocab.num_compressed if model_cfg.engram else None
    bound = {}
    for name, lookup in (
        ("engram", corpus.compressed_vocab.lookup),
        ("overencoding", None),  # hashes raw ids
    ):
        cfg = getattr(model_cfg, name)
        if cfg is not None:
            if name == "engram" and not cfg.compress_tokens:
                lookup = None
            pad = resolve_pad_id(
                cfg.pad_id,
                corpus.tokenizer,
                lookup,
                pad_token=PAD_TOKEN,
                eos_token=EOS_TOKEN,
                field=f"{name}.pad_id",
            )
            bound[name] = dataclasses.replace(cfg, pad_id=pad)
    return dataclasses.replace(
        model_cfg, vocab_size=corpus.vocab_size, compressed_vocab_size=compressed, **bound
    )


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path when it holds a run (its ``config.json``); else a
    ``FileNotFoundError`` saying what to pass instead."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        what = "does not exist" if not run.exists() else "holds no run (no config.json)"
        raise FileNotFoundError(
            f"{run} {what}: pass a run folder written by `engramlm train` (its --train.out_dir, "
            "runs/train by default)"
        )
    return run


def build_run_model(
    run_dir: str | Path, device: str | torch.device = "cpu", tables: TablePlan | None = None
) -> tuple[EngramLM, Any, dict[str, Any]]:
    """A run directory's model (initialised, not loaded), tokenizer and resolved configs."""
    from tokenizers import Tokenizer

    from engramlm.tokenization import CompressedVocab

    run = check_run_dir(run_dir)
    for name in ("tokenizer.json", "compressed_vocab.json"):
        if not (run / name).exists():
            raise FileNotFoundError(f"{run / name} is missing: is {run} a run written by train?")
    configs = json.loads((run / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    vocab = CompressedVocab.load(run / "compressed_vocab.json")
    vocab.check_tokenizer(tokenizer)
    model_cfg = ModelConfig.from_dict(configs["model"])
    if model_cfg.engram is not None:
        lookup = vocab.lookup if model_cfg.engram.compress_tokens else None
        try:
            resolve_pad_id(model_cfg.engram.pad_id, tokenizer, lookup)
        except ValueError as err:  # runs trained before the filler was checked
            logger.warning("%s. %s was trained with this filler: retrain it to fix", err, run)
    model = EngramLM(model_cfg, vocab if model_cfg.engram else None, tables=tables).to(device)
    return model, tokenizer, configs


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", tables: TablePlan | None = None
) -> tuple[EngramLM, Any]:
    """The trained model and tokenizer of a run directory, from its last good checkpoint.

    ``tables`` places the Engram tables (default: on ``device``), whatever tier the run
    trained them on: a checkpoint's table weights do not depend on the backend.
    """
    model, tokenizer, _ = build_run_model(run_dir, device, tables)
    # The newest checkpoint that verifies; FileNotFoundError when there is none.
    load_checkpoint(run_dir, model=model, optimizers={}, map_location=device, restore_rng=False)
    model.eval()
    return model, tokenizer


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | None = None,
    max_batches: int | None = None,
    table_storage: TableKind | None = None,
    split_seed: int | None = None,
) -> tuple[float, float, int]:
    """(loss nats, bits per byte, tokens scored) of a run on its validation split or ``data``.

    The validation split is rebuilt as the run was split: the seed its ``config.json`` keeps
    (runs written before it kept one: the training seed, or ``split_seed``), and refused if that
    gives another tokenizer than the run's. ``table_storage`` places the Engram tables (default:
    the tier the run trained on); disk tables are rebuilt from the checkpoint in a temporary
    folder inside the run.
    """
    saved = json.loads((check_run_dir(run_dir) / "config.json").read_text())
    cfg = TrainConfig.from_dict(saved["train"])
    split = dict(saved.get("split") or {"seed": cfg.seed, "tuning": False})
    if split_seed is not None:
        split["seed"] = split_seed
    split["fingerprint"] = saved.get("tokenizer_fingerprint")
    storage = table_storage or cfg.table_storage
    with contextlib.ExitStack() as stack:
        live = None
        if storage == "disk":
            live = stack.enter_context(tempfile.TemporaryDirectory(dir=run_dir, prefix=".eval-"))
        plan = TablePlan(storage, path=live, cache_mb=cfg.table_cache_mb)
        model, tokenizer = load_run(run_dir, tables=plan)
        stack.callback(model.close_tables)
        return _evaluate_text(model, tokenizer, cfg, data, max_batches, split)


def _evaluate_text(
    model: EngramLM,
    tokenizer: Any,
    cfg: TrainConfig,
    data: str | None,
    max_batches: int | None,
    split: dict[str, Any],
) -> tuple[float, float, int]:
    import numpy as np

    from engramlm.data import load_documents, prepare_corpus, special_token_id

    if data is None:
        corpus = prepare_corpus(
            cfg.data,
            vocab_size=cfg.vocab_size,
            val_fraction=cfg.val_fraction,
            seed=split["seed"],
            tuning=split["tuning"],
        )
        if split["fingerprint"] not in (None, corpus.compressed_vocab.fingerprint):
            raise ValueError(
                f"the run's validation split cannot be rebuilt: {cfg.data!r} split with seed "
                f"{split['seed']} gives another tokenizer than the run's. Runs of `engramlm "
                "experiment` and the recipes written before runs kept their split were split "
                "with seed 0 whatever their training seed: pass --split-seed 0 (or score text "
                "of yours with --data)"
            )
        tokens, num_bytes = corpus.val.tokens, corpus.val.stats()["bytes"]
    else:
        docs = load_documents(data)
        eos = special_token_id(tokenizer)
        ids: list[int] = []
        for enc in tokenizer.encode_batch([d.text for d in docs]):
            ids.extend(enc.ids)
            ids.append(eos)
        tokens = np.asarray(ids, dtype=np.int64)
        num_bytes = sum(len(d.text.encode()) for d in docs)
    batches = ValBatches(
        tokens, cfg.batch_size, cfg.seq_len, max_batches=max_batches, hash_fn=batch_hasher(model)
    )
    loss = evaluate(model, batches, cfg, torch.device("cpu"))
    scored = min(len(batches.starts), len(batches) * batches.batch_size) * cfg.seq_len
    # Tokens per byte of the whole text converts nats/token into bits/byte.
    return loss, loss * len(tokens) / (num_bytes * math.log(2)), scored
