"""What every experiment shares: sizes, the corpus, cached training runs, results and plots.

An experiment is a module with ``run(ctx: Context) -> dict``. It trains models through
:meth:`Context.train` (each run stored once per configuration under ``runs/_models/`` and linked
as ``runs/<name>/models/<key>``: a finished run is read back, an interrupted one resumes from
its last checkpoint, so re-running an experiment only does the work that is missing, and
experiments that train the same model share it), measures, draws with
:meth:`Context.savefig`, and returns a JSON-able dict that :meth:`Context.save_results` checks
(every number finite) and writes to ``runs/<name>/results.json`` with the command, machine and
wall time.

Sizes: the default model is the main job's (``engramlm.compare``: 4 layers, width 256, 16
experts top-2 + 1 shared, 128-token sequences) so numbers line up with the README; ``scale``
multiplies training steps (``--scale 4`` on a GPU); ``smoke`` shrinks everything to seconds
(CI checks that outputs exist and are finite and the properties that hold at any size).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from engramlm.compare import DEFAULT_ENGRAM, DEFAULT_MOE, DEFAULT_TRAIN
from engramlm.config import EngramConfig, ModelConfig
from engramlm.data import PreparedCorpus, prepare_corpus
from engramlm.model import EngramLM
from engramlm.overrides import Schema
from engramlm.train import TrainConfig, TrainResult, load_run, train

logger = logging.getLogger(__name__)

# What `engramlm experiment NAME --moe.hidden_size=512 --train.steps=600 ...` may override.
OVERRIDES: Schema = {"moe": ModelConfig, "engram": EngramConfig, "train": TrainConfig}

# Smoke size: a 2-layer width-64 MoE, a few steps, a small vocabulary (seconds per run), on the
# standard library's source (the `stdlib` corpus), which is wherever Python is: CI needs no corpus.
SMOKE_MOE = dataclasses.replace(
    DEFAULT_MOE,
    num_layers=2,
    hidden_size=64,
    num_heads=2,
    num_kv_heads=2,
    ffn_hidden_size=128,
    num_experts=8,
    expert_hidden_size=32,
    max_seq_len=64,
)
SMOKE_ENGRAM = dataclasses.replace(DEFAULT_ENGRAM, heads_per_ngram=2, embed_dim_per_ngram=16)
SMOKE_TRAIN = dataclasses.replace(
    DEFAULT_TRAIN,
    data="stdlib",
    vocab_size=512,
    seq_len=32,
    batch_size=4,
    steps=6,
    warmup_steps=2,
    eval_every=3,
    eval_batches=2,
    log_every=1,
)


@dataclass
class Context:
    """One experiment's settings, output folder and cached training runs."""

    name: str
    out_root: Path = Path("runs")
    scale: float = 1.0  # multiplies training steps
    smoke: bool = False  # CI size: seconds, outputs only
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"
    progress: bool = True
    data: str | None = None  # corpus override (a named corpus or a path); None = default
    # Field overrides of the base configs: {"moe": {...}, "engram": {...}, "train": {...}}
    # (the CLI's --moe.hidden_size=512 --train.steps=600 ...).
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Where trained runs are stored; None = <out_root>/_models. A recipe that writes its results
    # elsewhere can still share the experiments' runs by pointing this at runs/_models.
    models_root: Path | None = None
    # Where each finished run's result is also kept as ``<digest>.json`` (a folder in the
    # repository, so that results outlive the ``runs/`` folder a new clone does not have). A run
    # with a record and no stored result is read from its record, not retrained; the record has
    # no weights, so ``load`` still needs the run itself. None = no records.
    records_root: Path | None = None
    started: float = field(default_factory=time.time)
    # Corpora of training configs that name other data than the default (``corpus_for``), and
    # those an experiment built itself, by the label its training configs give as ``data``.
    _corpora: dict[tuple[str, int, float], PreparedCorpus] = field(
        default_factory=dict, init=False, repr=False
    )
    _provided: dict[str, PreparedCorpus] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"--scale must be > 0, got {self.scale}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        unknown = set(self.settings) - {"moe", "engram", "train"}
        if unknown:
            raise ValueError(
                f"experiment settings {sorted(unknown)}: only --moe.*, --engram.* and --train.* "
                "override the base configs"
            )
        _ = self.base_moe, self.base_engram, self.train_config()  # invalid overrides fail now
        self.out_root = Path(self.out_root)
        self.models_root = Path(self.models_root or self.out_root / "_models")
        if self.records_root is not None:
            self.records_root = Path(self.records_root)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def out_dir(self) -> Path:
        return self.out_root / self.name

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def base_moe(self) -> ModelConfig:
        """The pure-MoE reference (rho = 1) every experiment starts from."""
        return self._overridden(SMOKE_MOE if self.smoke else DEFAULT_MOE, "moe")

    @property
    def base_engram(self) -> EngramConfig:
        """Engram's shape (layer 1, 2- and 3-grams); table sizes are set by ``allocate``."""
        return self._overridden(SMOKE_ENGRAM if self.smoke else DEFAULT_ENGRAM, "engram")

    def _overridden(self, cfg: Any, section: str) -> Any:
        changes = self.settings.get(section)
        return type(cfg).from_dict({**cfg.to_dict(), **changes}) if changes else cfg

    def train_config(self, **changes: Any) -> TrainConfig:
        """The default training recipe with the ``--train.*`` settings, steps scaled, and
        ``changes`` applied."""
        base = self._overridden(SMOKE_TRAIN if self.smoke else DEFAULT_TRAIN, "train")
        if self.data is not None:
            base = dataclasses.replace(base, data=self.data)
        if not self.smoke and self.scale != 1.0:
            steps = max(1, round(base.steps * self.scale))
            base = dataclasses.replace(
                base,
                steps=steps,
                warmup_steps=max(1, round(base.warmup_steps * self.scale)),
                eval_every=max(1, round(base.eval_every * self.scale)),
            )
        # Checkpoint at every evaluation (one kept) so an interrupted experiment resumes.
        base = dataclasses.replace(base, ckpt_every=base.eval_every, keep_checkpoints=1)
        return dataclasses.replace(base, **changes)

    @cached_property
    def corpus(self) -> PreparedCorpus:
        """The default corpus, tokenized once (cached on disk across runs)."""
        cfg = self.train_config()
        return prepare_corpus(cfg.data, vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction)

    def provide_corpus(self, data: str, corpus: PreparedCorpus) -> None:
        """Train the configs whose ``data`` is the label ``data`` on ``corpus``: a corpus the
        experiment built itself (longctx's mixture of text and probes), not one to prepare."""
        self._provided[data] = corpus

    def corpus_for(self, train_cfg: TrainConfig) -> PreparedCorpus:
        """The corpus ``train_cfg`` trains on: :attr:`corpus` when it names the default data,
        vocabulary size and validation share, else the one it names, prepared once. Every seed
        gets the same split (drawn with seed 0): margins between seeds compare one set of
        held-out documents."""
        if train_cfg.data in self._provided:
            return self._provided[train_cfg.data]
        key = (train_cfg.data, train_cfg.vocab_size, train_cfg.val_fraction)
        base = self.train_config()
        if key == (base.data, base.vocab_size, base.val_fraction):
            return self.corpus
        if key not in self._corpora:
            self._corpora[key] = prepare_corpus(
                train_cfg.data, vocab_size=train_cfg.vocab_size, val_fraction=train_cfg.val_fraction
            )
        return self._corpora[key]

    # --- training ------------------------------------------------------------------------------
    def train(
        self, key: str, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None
    ) -> TrainResult:
        """Train ``model_cfg``, reachable as ``models/<key>``: cached, resumed when cut off.

        Runs are stored once per configuration under ``<models_root>/<digest>`` (digest of
        the model and training configs), and ``models/<key>`` links there, so experiments that
        train the same model (the allocation sweep's rho = 1 and the analyses' MoE, say) share
        it. A finished run is read back; one with checkpoints but no result resumes; a run being
        trained by another process (an experiment started beside this one) is waited for (a
        lock file beside it) and then read back. With ``records_root``, a finished run's result
        is also written there, and a run with a record but no stored result is read from it.
        """
        train_cfg = train_cfg or self.train_config()
        digest, wanted = run_digest(model_cfg, train_cfg)
        run_dir = self.models_root / digest
        link = self.out_dir / "models" / key
        link.parent.mkdir(parents=True, exist_ok=True)
        target = Path(os.path.relpath(run_dir, link.parent))  # ../../_models/<digest> by default
        if link.is_symlink() or link.exists():
            if link.resolve() != run_dir.resolve():
                if link.is_symlink() or link.is_file():
                    link.unlink()
                else:
                    shutil.rmtree(link)
        if not link.exists():
            try:
                link.symlink_to(target, target_is_directory=True)
            except FileExistsError:  # an experiment started beside this one linked it first
                if link.resolve() != run_dir.resolve():
                    raise
        train_cfg = dataclasses.replace(train_cfg, out_dir=str(run_dir))
        result_file = run_dir / "result.json"
        # One trainer per stored run: experiments started side by side that need the same model
        # wait for it here and then read it back, instead of training it twice at once.
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = self.records_root / f"{digest}.json" if self.records_root else None
            if result_file.exists():
                logger.info("%s/%s: finished earlier, reading %s", self.name, key, result_file)
                result = TrainResult(**json.loads(result_file.read_text()))
            elif record is not None and record.exists():
                logger.info(
                    "%s/%s: finished earlier, reading its record %s", self.name, key, record
                )
                return read_record(record, wanted)
            else:
                logger.info(
                    "%s/%s: training %d steps in %s", self.name, key, train_cfg.steps, run_dir
                )
                result = train(
                    model_cfg,
                    train_cfg,
                    resume=run_dir.exists(),
                    corpus=self.corpus_for(train_cfg),
                    progress=self.progress,
                    device=self.device,
                )
            if record is not None and not record.exists():
                write_record(record, key, wanted, result)
            return result

    def finished(
        self, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None
    ) -> TrainResult | None:
        """The result of this configuration's run where :meth:`train` would read one back (a
        finished run under ``models_root``, else its record), or None; never trains."""
        digest, wanted = run_digest(model_cfg, train_cfg or self.train_config())
        result_file = self.models_root / digest / "result.json"
        if result_file.exists():
            return TrainResult(**json.loads(result_file.read_text()))
        record = self.records_root / f"{digest}.json" if self.records_root else None
        return read_record(record, wanted) if record is not None and record.exists() else None

    def load(self, key: str) -> EngramLM:
        """The trained model of ``models/<key>`` in eval mode."""
        model, _ = load_run(self.out_dir / "models" / key, device=self.device)
        return model.eval()

    # --- outputs -------------------------------------------------------------------------------
    def savefig(self, fig: Any, name: str) -> Path:
        """Write a matplotlib figure as ``runs/<name>/<name>.png`` and close it."""
        import matplotlib.pyplot as plt

        path = self.out_dir / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path

    def save_results(self, results: dict[str, Any]) -> Path:
        """Check every number is finite, add how it was made, write ``results.json``."""
        check_finite(results)
        doc = {
            "experiment": self.name,
            "command": shlex.join(["engramlm", *sys.argv[1:]]) if sys.argv else "",
            "scale": self.scale,
            "smoke": self.smoke,
            "seeds": list(self.seeds),
            "settings": self.settings,
            "machine": machine(),
            "wall_seconds": round(time.time() - self.started, 1),
            "results": results,
        }
        path = self.out_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, path)
        return path


# Part of every run digest; raised when a default changes what a model computes while its config
# reads the same, so that runs stored before are retrained, never reused. 2: the n-gram filler
# is the tokenizer's pad (was raw id 2, an ordinary token), the conv norm's eps 1e-5, fused
# key/value projections (another order of initial draws).
BEHAVIOUR_VERSION = 2


def run_digest(model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
    """(digest, what it digests): a run's identity, from the fields its configs change from the
    defaults (not where it is written) and the training behaviour's version."""
    wanted = {"model": changed_fields(model_cfg), "train": changed_fields(train_cfg)}
    wanted["train"].pop("out_dir", None)
    wanted["behaviour"] = BEHAVIOUR_VERSION
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    return digest, wanted


def write_record(path: Path, key: str, wanted: dict[str, Any], result: TrainResult) -> None:
    """Keep a finished run's result as ``path`` (atomically): the configuration it was trained
    with (what its digest hashes), the machine (runs are stored locally, so the one it trained
    on; the thread count in that line is the recording process's), and the result, whose
    ``threads`` is the training's own count."""
    doc = {
        "key": key,
        "config": wanted,
        "machine": machine(),
        "result": dataclasses.asdict(result),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def read_record(path: Path, wanted: dict[str, Any]) -> TrainResult:
    """The result kept in a record, after checking it was trained with ``wanted``."""
    doc = json.loads(path.read_text())
    if doc.get("config") != json.loads(json.dumps(wanted)):
        raise ValueError(
            f"{path}: this record's configuration is not the one its name (the digest) stands "
            "for; the file was edited or copied under another name. Delete it to retrain the run."
        )
    return TrainResult(**doc["result"])


def changed_fields(cfg: Any) -> Any:
    """A config as a JSON-able dict of the fields that differ from their defaults (recursively).

    Run digests use this, so a later release that adds a field with a behaviour-preserving
    default still finds the runs stored before it.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out = {}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            out[f.name] = changed_fields(value)
        return out
    if isinstance(cfg, (tuple, list)):
        return [changed_fields(v) for v in cfg]
    return cfg


def check_finite(obj: Any, where: str = "results") -> None:
    """Raise ValueError naming the first NaN/inf number in a nested dict/list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, f"{where}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}: the experiment produced a non-finite number")


def machine() -> str:
    """A one-line description of where a result was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    # The thread count sets the summation order of CPU kernels: runs reproduce bitwise only
    # with the same count (OMP_NUM_THREADS).
    threads = torch.get_num_threads()
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, "
        f"{threads} thread{'s' if threads != 1 else ''}"
    )
