"""Checkpoints that are written atomically and verified on load.

A checkpoint is a directory ``<run_dir>/checkpoints/step_<N:08d>/`` holding

- ``model.safetensors``      the model's state dict; tensors that share storage (a tied
                             embedding and LM head) are stored once, the other names recorded
                             as aliases in the header metadata;
- ``optimizer.safetensors``  every tensor of every optimizer's state dict, under stable keys
                             ``opt.<name>.state.<param_idx>.<key>``;
- ``optimizer.json``         the rest of the optimizer state dicts (param groups, scalars);
- ``trainer.safetensors``    tensors inside the trainer state and the RNG states (a
                             ``torch.Generator`` state, the torch CPU/CUDA RNG states);
- ``trainer.json``           step, trainer state (tokens seen, data loader state, ...), RNG
                             states, the resolved config, the tokenizer fingerprint;
- ``tables/<module>/*.engt`` copies of file-backed Engram tables (the disk tier: weights and
                             both Adam moments), one folder per table module; see below;
- ``table_shards/``          a sharded run's Engram tables (``engramlm.distributed``): per rank
                             ``rank<r>.safetensors`` (its rows of each table and their Adam
                             moments) or, for disk-tier shards, ``rank<r>/<module>/*.engt``;
- ``manifest.json``          size and checksum of every other file, written last; for a sharded
                             run also which rows each shard holds (``table_shards``).

Disk tables (SPEC §5) are too big for a state dict, and training keeps rewriting their live
files after a checkpoint, so the checkpoint holds a snapshot: at save time each store is
flushed and its file copied into ``tables/`` (sparse-aware, one read + one write of the
written data: O(table bytes) per checkpoint, seconds per GB). The manifest records each copy's
size and the table file's own data checksum (``engt_crc32``: a CRC32 over 64 MiB chunk CRCs,
computed during the copy) instead of a SHA-256, which would cost another full read. Loading
copies the snapshot back into the live files (resume), or reads its weights into a table of
another tier (serving). An undo log (cost O(rows touched since the checkpoint)) would scale
better for tables of hundreds of GB; the snapshot was chosen for simplicity.

Sharded runs (SPEC §5): every rank writes its own rows into the staging directory
(:func:`write_table_shards`), then rank 0 writes everything else and commits
(``save_checkpoint(staging=..., table_shards=...)``) with the same atomic rename. The dense
files are those of a one-process run, so any process loads a sharded checkpoint: a model with
whole tables gets each table put together from the shards (``engramlm eval``, ``generate``, a
resume on one process), and a sharded model reads only its own rows, from shards of any world
size or from a one-process checkpoint (:class:`TableRows`).

Nothing is pickled: everything loads with safetensors and json, so a checkpoint from an
untrusted source cannot run code.

Crash safety comes from the order of operations in :func:`save_checkpoint`: files go into
``step_<N>.tmp-<pid>/`` and are fsynced, the manifest is written and fsynced last, then one
``rename`` gives the directory its final name and the ``latest`` pointer is replaced atomically.
A directory with a final name therefore always holds a manifest; a crash at any point leaves
either the previous checkpoints untouched or the new one complete. Corruption after the fact
(truncation, a flipped bit) is caught by :func:`verify_checkpoint`, and loading a run directory
falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, TRAINER_TENSORS, TRAINER_JSON)
TABLES_DIR = "tables"
SHARDS_DIR = "table_shards"
TABLE_TENSORS = ("weight", "exp_avg", "exp_avg_sq")  # per table row: weights, Adam moments

_STEP_RE = re.compile(r"step_(\d+)")
_TMP_RE = re.compile(r"(?:step_\d+|latest)\.tmp-(\d+)(?:\..*)?")
# JSON stand-ins for values JSON cannot hold: a tensor (stored in a safetensors file under the
# given key) and a tuple (so optimizer betas and user tuples come back as tuples).
_TENSOR_TAG = "__tensor__"
# The keys load_checkpoint adds to the trainer state it returns (so save_checkpoint refuses them).
RESERVED_KEYS = {"rng", "config", "tokenizer_fingerprint", "path", "torch_version", "created_unix"}
_TUPLE_TAG = "__tuple__"


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupt, or does not fit what it is being loaded into."""


@dataclass(frozen=True)
class TableShard:
    """Rows ``[start, stop)`` of the table module ``name`` (``num_rows`` rows in all) that this
    process holds in ``table``, an :class:`~engramlm.tables.OffloadedTable` addressed by
    shard-local ids (global row - ``start``), whose ``step_count`` is its optimiser's step."""

    name: str
    start: int
    stop: int
    num_rows: int
    table: Any


# A loaded tensor and the model's (or optimiser's) own one -> the loaded values in the own
# one's layout: the identity, or an FSDP2 DTensor sharded like it (``engramlm.distributed``).
Place = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Public API


def checkpoint_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """Where the checkpoint for ``step`` lives (whether or not it exists)."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module | Mapping[str, Tensor],
    optimizers: Mapping[str, torch.optim.Optimizer | Mapping[str, Any]],
    trainer_state: Mapping[str, Any],
    config: Mapping[str, Any],
    tokenizer_fingerprint: str | None = None,
    keep: int = 3,
    staging: Path | None = None,
    table_shards: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write a checkpoint for ``step`` atomically and return its directory.

    ``model`` and each optimizer may be given as their state dicts instead (gathered from
    FSDP shards, say). A sharded run passes the ``staging`` directory of
    :func:`stage_checkpoint` and the ranks' :func:`write_table_shards` records, whose files
    are already in it: they join the manifest, which also records each shard's rows.

    ``trainer_state`` is anything the loop needs to resume (tokens seen, the data loader's
    state dict, ...): nested dicts with string keys, lists, tuples, str/int/float/bool/None and
    tensors. ``config`` is the resolved config (plain JSON), stored so that
    :func:`check_compatible` can refuse a resume with a different one. The RNG states of
    python, numpy and torch (CPU and CUDA) are captured here, at the moment of saving.

    The keys that :func:`load_checkpoint` adds to the trainer state are reserved (``step``
    may be included if it equals ``step``).

    Only the newest ``keep`` checkpoints up to this step survive; older ones are removed only
    after the new one is complete. Checkpoints from later steps (a run that was rolled back)
    are left alone. Leftover ``.tmp-*`` directories from crashed saves are removed first.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint just written is kept), got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    reserved = sorted(k for k in RESERVED_KEYS & trainer_state.keys())
    if reserved:
        raise ValueError(f"trainer_state keys {reserved} are reserved by the checkpoint record")
    if trainer_state.get("step", step) != step:
        raise ValueError(f"trainer_state['step'] is {trainer_state['step']}, saving step {step}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = checkpoint_dir(run_dir, step)
    if staging is None:
        tmp = stage_checkpoint(run_dir, step)
    elif staging.parent != root or not staging.name.startswith(f"{final.name}.tmp-"):
        raise ValueError(f"{staging} is not a staging directory for {final}")
    else:
        tmp = staging

    _write_model(tmp / MODEL_FILE, model if isinstance(model, Mapping) else model.state_dict())
    table_files = {} if isinstance(model, Mapping) else _write_table_files(tmp / TABLES_DIR, model)
    _write_optimizers(tmp, optimizers)
    trainer_tensors: dict[str, Tensor] = {}
    record = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "trainer_state": _encode(dict(trainer_state), "trainer_state", trainer_tensors),
        "rng": _encode(capture_rng_state(), "rng", trainer_tensors),
        "config": _plain_json(dict(config), "config"),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "torch_version": torch.__version__,
        "created_unix": time.time(),
    }
    _save_tensors(tmp / TRAINER_TENSORS, trainer_tensors)
    _write_json(tmp / TRAINER_JSON, record)

    files: dict[str, dict[str, Any]] = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tmp.iterdir())
        if p.is_file()
    }
    for name, crc in table_files.items():
        files[name] = {"bytes": (tmp / name).stat().st_size, "engt_crc32": crc}
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    if table_shards:
        for record in table_shards:
            files.update(record["files"])
        manifest["table_shards"] = _shard_layout(table_shards)
    _write_json(tmp / MANIFEST, manifest)
    _fsync_path(tmp)

    if final.exists():
        # Re-saving a step (a run resumed from before it): move the old one out of the way
        # under a tmp name, so that no half-deleted directory ever carries a final name.
        logger.warning("replacing existing checkpoint %s", final)
        old = root / f"{final.name}.tmp-{os.getpid()}.replaced"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_path(root)

    latest_tmp = root / f"{LATEST}.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    _fsync_path(latest_tmp)
    os.replace(latest_tmp, root / LATEST)
    _fsync_path(root)
    logger.info("saved checkpoint %s", final)

    _prune(root, step, keep)
    return final


def load_checkpoint(
    path_or_run_dir: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    map_location: str | torch.device = "cpu",
    config: Mapping[str, Any] | None = None,
    tokenizer_fingerprint: str | None = None,
    restore_rng: bool = True,
    table_shards: Sequence[TableShard] = (),
    place: Place | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint into ``model`` and ``optimizers`` in place; return its record.

    ``path_or_run_dir`` is a checkpoint directory (verified; an error if it fails) or a run
    directory, in which case the checkpoint named by ``latest`` is used, falling back to the
    newest checkpoint that verifies (with a warning naming what failed).

    Given ``config`` / ``tokenizer_fingerprint``, the saved ones must match (see
    :func:`check_compatible`) before anything is touched. ``optimizers`` must have the same
    names as at save time; ``None`` or ``{}`` restores the model only (evaluation, export).
    ``restore_rng`` sets the python/numpy/torch RNGs to their state at save time.

    A sharded model (``engramlm.distributed``) passes the rows it holds as ``table_shards``:
    each shard reads its rows, their Adam moments and the step from the checkpoint, whatever
    its layout (shards of any world size, or whole tables); the tables' optimiser is then not
    in ``optimizers``. ``place`` puts each loaded tensor into the layout of the model's own
    (FSDP2 DTensors). A model with whole tables loads a sharded checkpoint's tables put
    together from the shards.

    Returns the saved ``trainer_state`` (tensors on CPU, tuples as tuples) with these keys
    added: ``step``, ``rng``, ``config``, ``tokenizer_fingerprint``, ``path``,
    ``torch_version``, ``created_unix``.
    """
    path = resolve_checkpoint(path_or_run_dir)

    record = json.loads((path / TRAINER_JSON).read_text())
    if config is not None:
        check_compatible(record["config"], dict(config), what="config")
    if tokenizer_fingerprint is not None:
        if record["tokenizer_fingerprint"] is None:
            logger.warning("%s records no tokenizer fingerprint; cannot check it", path)
        else:
            check_compatible(
                {"tokenizer_fingerprint": record["tokenizer_fingerprint"]},
                {"tokenizer_fingerprint": tokenizer_fingerprint},
                what="tokenizer",
            )

    sharded = {shard.name for shard in table_shards}
    moments = _read_model(path, model, map_location, sharded=sharded, place=place)
    if optimizers:
        _read_optimizers(
            path, optimizers, map_location, moments, sharded=bool(sharded), place=place
        )
    rows = checkpoint_tables(path, [shard.name for shard in table_shards]) if sharded else {}
    for shard in table_shards:
        if shard.name not in rows:
            raise CheckpointError(f"{path} holds no rows of the table {shard.name!r}")
        rows[shard.name].load_into(shard)
    trainer_tensors, _ = _load_tensors(path / TRAINER_TENSORS, "cpu")
    rng = _decode(record["rng"], trainer_tensors)
    if restore_rng:
        restore_rng_state(rng)
    logger.info("loaded checkpoint %s (step %d)", path, record["step"])
    return {
        **_decode(record["trainer_state"], trainer_tensors),
        "step": record["step"],
        "rng": rng,
        "config": record["config"],
        "tokenizer_fingerprint": record["tokenizer_fingerprint"],
        "path": path,
        "torch_version": record["torch_version"],
        "created_unix": record["created_unix"],
    }


def resolve_checkpoint(path_or_run_dir: str | os.PathLike[str]) -> Path:
    """A verified checkpoint directory: ``path_or_run_dir`` itself (an error if it fails), or
    its run directory's ``latest``, falling back to the newest checkpoint that verifies."""
    path = Path(path_or_run_dir)
    if _is_checkpoint_dir(path):
        verify_checkpoint(path)
        return path
    return _newest_verified(path)


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Check a checkpoint directory against its manifest; raise :class:`CheckpointError` if not.

    Catches: no manifest (the write never finished), a missing file, a size mismatch (a
    truncated copy), a SHA-256 mismatch (corruption, a flipped bit), a safetensors header
    that does not parse, and a table snapshot whose header or data checksum (``engt_crc32``)
    does not match. Every problem found is listed, each naming its file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path}: {MANIFEST} is missing, so the checkpoint is incomplete "
            "(its write was interrupted); refusing to load it"
        )
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from e

    problems = [f"{name}: not listed in {MANIFEST}" for name in REQUIRED_FILES if name not in files]
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
            continue
        size = file.stat().st_size
        if size != entry["bytes"]:
            kind = "truncated" if size < entry["bytes"] else "longer than recorded"
            problems.append(
                f"{name}: size mismatch, {kind}: manifest says {entry['bytes']} bytes, found {size}"
            )
            continue
        if "engt_crc32" in entry:
            from engramlm.tables.disk import TableFileError, verify_snapshot

            try:
                verify_snapshot(file, entry["engt_crc32"])
            except TableFileError as e:
                problems.append(f"{name}: {e}")
            continue
        digest = _sha256(file)
        if digest != entry["sha256"]:
            problems.append(
                f"{name}: SHA-256 checksum mismatch (corrupt file): manifest says "
                f"{entry['sha256']}, found {digest}"
            )
            continue
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(file, framework="pt") as f:
                    f.keys()
            except Exception as e:  # safetensors raises its own error types from Rust
                problems.append(f"{name}: unparsable safetensors header ({e})")
    if problems:
        raise CheckpointError(f"{path} failed verification:\n  " + "\n  ".join(problems))


def find_latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to resume from: ``latest`` if it names a complete one, else the newest
    complete one (complete = has a manifest; contents are checked by :func:`verify_checkpoint`,
    which reads every byte). ``None`` when there is none, i.e. start from scratch."""
    candidates = _candidates(Path(run_dir))
    return candidates[0] if candidates else None


def check_compatible(
    saved: Mapping[str, Any], current: Mapping[str, Any], what: str = "model config"
) -> None:
    """Raise :class:`CheckpointError` listing every key (dotted path) where ``saved`` and
    ``current`` differ, with both values; used to refuse resuming with a different model config
    or tokenizer. Lists and tuples compare equal element-wise (a TOML config has no tuples)."""
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    diffs = []
    for key in sorted(a.keys() | b.keys()):
        va, vb = a.get(key, missing), b.get(key, missing)
        if not _same(va, vb):
            shown = ["<absent>" if v is missing else repr(v) for v in (va, vb)]
            diffs.append(f"{key}: saved {shown[0]}, current {shown[1]}")
    if diffs:
        raise CheckpointError(
            f"{what} differs from the checkpoint's ({len(diffs)} keys):\n  " + "\n  ".join(diffs)
        )


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU, and every CUDA device if present) RNG states.

    Python and numpy states are converted to JSON-friendly lists; torch states are ByteTensors.
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the RNGs to a state from :func:`capture_rng_state` (or a loaded checkpoint)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": np.asarray(npst["key"], dtype=np.uint32), "pos": npst["pos"]},
            "has_gauss": npst["has_gauss"],
            "gauss": npst["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(list(cuda))
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this process sees %d; "
                "CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )


# --------------------------------------------------------------------------------------------
# Model and optimizer files


def _write_model(file: Path, state: Mapping[str, Tensor]) -> None:
    """Save the state dict once per storage; safetensors refuses tensors that share memory."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[str, int]] = set()
    for name, t in state.items():
        t = t.detach()
        if t.numel() == 0:
            tensors[name] = t.cpu()
            continue
        storage = (str(t.device), t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        # Overlapping but not the same view (rare): store a copy; load copies into the model's
        # own tensors, so the model's sharing survives either way.
        tensors[name] = (t.clone() if storage in storages else t).cpu().contiguous()
        storages.add(storage)
    _save_tensors(file, tensors, {"aliases": json.dumps(aliases, sort_keys=True)})


def _write_table_files(directory: Path, model: nn.Module) -> dict[str, int]:
    """Snapshot every file-backed table module (``has_files``) into ``directory/<module>/``.

    -> {path relative to the checkpoint: data checksum}; {} when the model has none.
    """
    out: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if not getattr(module, "has_files", False):
            continue
        folder = directory / module_name
        for file, crc in module.save_files(folder).items():
            out[f"{TABLES_DIR}/{module_name}/{file}"] = crc
        _fsync_path(folder)
    if out:
        _fsync_path(directory)
    return out


def _read_model(
    path: Path,
    model: nn.Module,
    map_location: str | torch.device,
    *,
    sharded: set[str],
    place: Place | None,
) -> dict[nn.Module, dict[str, Tensor]]:
    """Load the state dict, the table snapshots under ``tables/`` and a sharded run's tables.

    A snapshot goes back into a file-backed table of the model (a resume: weights and moments
    roll back to the checkpoint) or, for a table of another tier, its weights join the state
    dict under ``<module>.weight``, the key every tier loads, and its Adam moments are returned
    ({table module: {"exp_avg": ..., "exp_avg_sq": ...}}) for :func:`_read_optimizers`. So
    does a sharded run's table, put together from its shards. Tables named in ``sharded`` are
    left out: the model holds some of their rows only, which :class:`TableRows` loads.
    """
    moments: dict[nn.Module, dict[str, Tensor]] = {}
    file, tables = path / MODEL_FILE, path / TABLES_DIR
    skip = {f"{name}.weight" for name in sharded}
    state, meta = _load_tensors(file, map_location, skip=skip)
    for alias, name in json.loads(meta.get("aliases", "{}")).items():
        if alias not in skip:
            state[alias] = state[name]
    for folder in sorted(tables.iterdir()) if tables.is_dir() else []:
        if folder.name in sharded:
            continue
        try:
            module = model.get_submodule(folder.name)
        except AttributeError as e:
            raise CheckpointError(f"{folder}: the model has no module {folder.name!r}") from e
        from engramlm.tables.disk import TableFileError, snapshot_moments, snapshot_weights

        try:
            if getattr(module, "has_files", False):
                module.load_files(folder)
            else:
                state[f"{folder.name}.weight"] = snapshot_weights(folder)
                moments[module] = snapshot_moments(folder)
        except TableFileError as e:
            raise CheckpointError(str(e)) from e
    for name, rows in checkpoint_tables(path).items() if _shard_layout_of(path) else ():
        if name in sharded:
            continue
        state[f"{name}.weight"] = rows.read("weight", 0, rows.num_rows)
        kinds = TABLE_TENSORS[1:]
        found = {k: rows.read(k, 0, rows.num_rows) for k in kinds}
        moments[model.get_submodule(name)] = {k: v for k, v in found.items() if v is not None}
    if place is not None:
        own = model.state_dict()
        state = {k: place(v, own[k]) if k in own else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{file} does not fit the model: {e}") from e
    return moments


def _write_optimizers(
    directory: Path, optimizers: Mapping[str, torch.optim.Optimizer | Mapping[str, Any]]
) -> None:
    tensors: dict[str, Tensor] = {}
    saved: dict[str, Any] = {}
    for name, opt in optimizers.items():
        sd = opt if isinstance(opt, Mapping) else opt.state_dict()
        saved[name] = {
            # A list of [param_idx, entries] pairs keeps integer indices integers.
            "state": [
                [idx, _encode(entries, f"opt.{name}.state.{idx}", tensors)]
                for idx, entries in sd["state"].items()
            ],
            "param_groups": _encode(sd["param_groups"], f"opt.{name}.param_groups", tensors),
        }
    _save_tensors(directory / OPTIMIZER_TENSORS, tensors)
    _write_json(directory / OPTIMIZER_JSON, {"format_version": FORMAT_VERSION, "optimizers": saved})


def _read_optimizers(
    path: Path,
    optimizers: Mapping[str, torch.optim.Optimizer],
    map_location: str | torch.device,
    table_moments: Mapping[nn.Module, dict[str, Tensor]],
    *,
    sharded: bool = False,
    place: Place | None = None,
) -> None:
    """Load each optimizer's state; with ``sharded`` the tables' optimiser (``"tables"``) is
    not among ``optimizers``: the shards load their moments with their rows."""
    saved = json.loads((path / OPTIMIZER_JSON).read_text())["optimizers"]
    expected = set(saved) - {"tables"} if sharded else set(saved)
    if expected != set(optimizers):
        raise CheckpointError(
            f"{path / OPTIMIZER_JSON}: checkpoint has optimizers {sorted(expected)}, "
            f"got {sorted(optimizers)}"
        )
    tensors, _ = _load_tensors(path / OPTIMIZER_TENSORS, map_location)
    for name, opt in optimizers.items():
        entry = saved[name]
        sd = {
            "state": {idx: _decode(v, tensors) for idx, v in entry["state"]},
            "param_groups": _decode(entry["param_groups"], tensors),
        }
        _add_table_moments(opt, sd["state"], table_moments)
        if place is not None:
            params = [p for group in opt.param_groups for p in group["params"]]
            for idx, entries in sd["state"].items():
                for key, value in entries.items():
                    if isinstance(value, Tensor) and value.shape == params[idx].shape:
                        entries[key] = place(value, params[idx])
        try:
            opt.load_state_dict(sd)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"optimizer {name!r} from {path} does not fit: {e}") from e


def _add_table_moments(
    opt: torch.optim.Optimizer,
    state: dict[int, dict[str, Any]],
    table_moments: Mapping[nn.Module, dict[str, Tensor]],
) -> None:
    """Put a disk snapshot's Adam moments into the saved state of the table they belong to.

    A disk-tier checkpoint keeps only each table's ``step`` in the optimizer state, its moments
    in the snapshot; a table of another tier keeps them in its optimizer's state (SparseAdam,
    or TableAdam over host memory), indexed like the optimizer's params: the table's weight
    Parameter (SparseAdam) or the table itself (TableAdam).
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    for module, moments in table_moments.items():
        for index, param in enumerate(params):
            if param is module or param is getattr(module, "weight", None):
                state.setdefault(index, {"step": 0}).update(moments)


# --------------------------------------------------------------------------------------------
# Sharded tables (engramlm.distributed)


def stage_checkpoint(run_dir: str | os.PathLike[str], step: int) -> Path:
    """Create the staging directory of ``step``'s checkpoint (after removing leftovers of
    crashed saves); :func:`save_checkpoint` fills it and commits it with one rename."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(root)
    tmp = root / f"{checkpoint_dir(run_dir, step).name}.tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def write_table_shards(staging: Path, rank: int, shards: Sequence[TableShard]) -> dict[str, Any]:
    """Write this rank's rows of each table, and their Adam moments, into ``staging``.

    In-memory shards go into one ``table_shards/rank<r>.safetensors`` (``<module>.weight``,
    ``.exp_avg``, ``.exp_avg_sq``, each [stop - start, dim]); disk-tier shards are
    snapshotted by their own machinery into ``table_shards/rank<r>/<module>/``. Everything is
    fsynced. Returns what :func:`save_checkpoint` puts into the manifest: each file's size and
    checksum, each shard's rows and step.
    """
    from engramlm.tables.offload import resident

    files: dict[str, dict[str, Any]] = {}
    entries: list[dict[str, Any]] = []
    tensors: dict[str, Tensor] = {}
    rank_file = f"{SHARDS_DIR}/rank{rank:05d}.safetensors"
    for shard in shards:
        n, table = shard.stop - shard.start, shard.table
        if n == 0:
            continue  # the trailing ranks of a small table own no rows
        entry = {
            "name": shard.name,
            "rank": rank,
            "start": shard.start,
            "stop": shard.stop,
            "num_rows": shard.num_rows,
            "dim": table.dim,
            "step": table.step_count,
        }
        if table.has_files:
            entry["folder"] = folder = f"{SHARDS_DIR}/rank{rank:05d}/{shard.name}"
            for file, crc in table.save_files(staging / folder).items():
                size = (staging / folder / file).stat().st_size
                files[f"{folder}/{file}"] = {"bytes": size, "engt_crc32": crc}
            _fsync_path(staging / folder)
        else:
            entry["file"] = rank_file
            for kind, store in zip(TABLE_TENSORS, table.stores, strict=True):
                data = resident(store)
                assert data is not None  # our invariant: a table without files is in memory
                tensors[f"{shard.name}.{kind}"] = data[:n]
        entries.append(entry)
    if tensors:
        (staging / SHARDS_DIR).mkdir(exist_ok=True)
        _save_tensors(staging / rank_file, tensors)
        file = staging / rank_file
        files[rank_file] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    if entries:
        _fsync_path(staging / SHARDS_DIR)
    return {"files": files, "shards": entries}


def _shard_layout(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ranks' records -> the manifest's ``table_shards``: each table's shards by row."""
    tables: dict[str, dict[str, Any]] = {}
    for entry in (e for record in records for e in record["shards"]):
        keys = ("name", "num_rows", "dim", "step")
        table = tables.setdefault(entry["name"], {k: entry[k] for k in keys} | {"shards": []})
        # Our invariants: every rank steps every table (distributed.ShardedTableAdam), and the
        # shards partition the rows (distributed.shard_range).
        assert table["step"] == entry["step"], (table, entry)
        keys = ("rank", "start", "stop", "file", "folder")
        table["shards"].append({k: entry[k] for k in keys if k in entry})
    for table in tables.values():
        table["shards"].sort(key=lambda e: e["start"])
        bounds = [(e["start"], e["stop"]) for e in table["shards"]]
        assert bounds[0][0] == 0 and bounds[-1][1] == table["num_rows"], bounds
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False)), bounds
    return {"world_size": len(records), "tables": list(tables.values())}


def _shard_layout_of(path: Path) -> dict[str, Any] | None:
    return json.loads((path / MANIFEST).read_text()).get("table_shards")


@dataclass(frozen=True)
class _RowPiece:
    """Global rows [start, stop) of one table in one place: safetensors keys or a snapshot."""

    start: int
    stop: int
    keys: Mapping[str, tuple[Path, str]]  # "weight" / "exp_avg" / "exp_avg_sq" -> (file, key)
    folder: Path | None = None  # a disk-tier snapshot, memory-mapped


@dataclass(frozen=True)
class TableRows:
    """One Engram table's rows in a checkpoint, read by range whatever layout holds them: the
    shards of a sharded run (any world size) or a one-process run's whole table.

    Only the rows asked for are read (safetensors slices, memory-mapped snapshots), so a rank
    loading its shard never holds the whole table. ``step`` is the table optimiser's step.
    """

    name: str
    num_rows: int
    dim: int
    step: int
    pieces: tuple[_RowPiece, ...]

    def has(self, kind: str) -> bool:
        """Whether the checkpoint holds rows of ``kind`` (no moments: a table never stepped)."""
        from safetensors import safe_open

        for piece in self.pieces:
            if piece.folder is None:
                file, key = piece.keys[kind]
                with safe_open(file, framework="pt") as f:
                    if key not in f.keys():
                        return False
        return True

    def read(self, kind: str, start: int, stop: int) -> Tensor | None:
        """[stop - start, dim] float32 rows of ``kind`` (``weight``, ``exp_avg``,
        ``exp_avg_sq``); ``None`` when the checkpoint holds none (see :meth:`has`)."""
        from safetensors import safe_open

        from engramlm.tables.disk import snapshot_moments, snapshot_weights

        if not self.has(kind):
            return None
        parts = []
        for piece in self.pieces:
            a, b = max(start, piece.start) - piece.start, min(stop, piece.stop) - piece.start
            if a >= b:
                continue
            if piece.folder is not None:
                rows = (
                    snapshot_weights(piece.folder)
                    if kind == "weight"
                    else snapshot_moments(piece.folder)[kind]
                )
                parts.append(rows[a:b].clone())
                continue
            file, key = piece.keys[kind]
            with safe_open(file, framework="pt") as f:
                parts.append(f.get_slice(key)[a:b].float())
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    @torch.no_grad()
    def load_into(self, shard: TableShard) -> None:
        """Rows [shard.start, shard.stop), their moments and the step -> the shard's table.

        A disk-tier shard saved with these very rows is rolled back to its snapshot instead
        (bit for bit, without reading the rows through memory).
        """
        from engramlm.tables.offload import row_chunks

        table, n = shard.table, shard.stop - shard.start
        if (shard.num_rows, table.dim) != (self.num_rows, self.dim):
            raise CheckpointError(
                f"table {self.name!r} is [{self.num_rows}, {self.dim}] in the checkpoint, "
                f"[{shard.num_rows}, {table.dim}] in the model"
            )
        same = [p for p in self.pieces if (p.start, p.stop) == (shard.start, shard.stop)]
        if table.has_files and same and same[0].folder is not None:
            table.load_files(same[0].folder)
        else:
            table.pending.clear()
            for kind, store in zip(TABLE_TENSORS, table.stores, strict=True):
                if not self.has(kind):
                    store.zero_()  # never stepped: Adam starts from zero moments
                    continue
                for a, b in row_chunks(n):
                    values = self.read(kind, shard.start + a, shard.start + b)
                    assert values is not None  # our invariant: weights are always saved
                    if kind == "weight":
                        table.write_range(a, values)
                    else:
                        store.write_range(a, values)
            table.flush()
        table.step_count = self.step


def checkpoint_tables(path: Path, names: Sequence[str] = ()) -> dict[str, TableRows]:
    """The Engram tables of checkpoint ``path`` as :class:`TableRows`, by module name.

    A sharded checkpoint lists its tables in its manifest. A one-process checkpoint does not
    say which modules are tables: ``names`` gives them, in the order of the tables'
    optimiser (``EngramLM.engram_tables``); their weights are ``<name>.weight`` in the model
    file or a disk-tier snapshot, their moments the ``"tables"`` optimiser's state.
    """
    layout = _shard_layout_of(path)
    if layout is not None:
        out = {}
        for t in layout["tables"]:
            pieces = []
            for e in t["shards"]:
                keys = {}
                if "file" in e:
                    keys = {k: (path / e["file"], f"{t['name']}.{k}") for k in TABLE_TENSORS}
                folder = path / e["folder"] if "folder" in e else None
                pieces.append(_RowPiece(e["start"], e["stop"], keys, folder))
            out[t["name"]] = TableRows(t["name"], t["num_rows"], t["dim"], t["step"], tuple(pieces))
        return out
    from safetensors import safe_open

    from engramlm.tables.disk import snapshot_weights

    optimizers = json.loads((path / OPTIMIZER_JSON).read_text())["optimizers"]
    steps = {i: entry.get("step", 0) for i, entry in optimizers.get("tables", {}).get("state", [])}
    with safe_open(path / MODEL_FILE, framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    out = {}
    for i, name in enumerate(names):
        moments = {
            k: (path / OPTIMIZER_TENSORS, f"opt.tables.state.{i}.{k}") for k in TABLE_TENSORS
        }
        if f"{name}.weight" in shapes:
            num_rows, dim = shapes[f"{name}.weight"]
            piece = _RowPiece(
                0, num_rows, {**moments, "weight": (path / MODEL_FILE, f"{name}.weight")}
            )
        elif (path / TABLES_DIR / name).is_dir():
            num_rows, dim = snapshot_weights(path / TABLES_DIR / name).shape
            piece = _RowPiece(0, num_rows, {}, path / TABLES_DIR / name)
        else:
            raise CheckpointError(f"{path} holds no table {name!r}")
        out[name] = TableRows(name, num_rows, dim, int(steps.get(i, 0)), (piece,))
    return out


# --------------------------------------------------------------------------------------------
# Encoding: nested python values <-> JSON + a flat dict of tensors


def _encode(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """Replace tensors by ``{"__tensor__": key}`` (collecting them) and tuples by
    ``{"__tuple__": [...]}``; keys are dotted paths, so they are stable across saves."""
    if isinstance(obj, Tensor):
        if key in tensors:
            raise ValueError(f"two tensors map to key {key!r}; avoid '.' in dict keys")
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR_TAG: key}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{key}: dict keys must be str to round-trip, got {k!r}")
            if k in (_TENSOR_TAG, _TUPLE_TAG):
                raise ValueError(f"{key}: the key {k!r} is reserved by the checkpoint format")
            out[k] = _encode(v, f"{key}.{k}", tensors)
        return out
    if isinstance(obj, tuple):
        return {_TUPLE_TAG: [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TypeError(f"{key}: cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_TAG}:
            return tensors[obj[_TENSOR_TAG]]
        if set(obj) == {_TUPLE_TAG}:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE_TAG])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _plain_json(obj: Any, what: str) -> Any:
    """``obj`` as plain JSON (tuples become lists); the config stays readable by hand."""
    try:
        return json.loads(json.dumps(obj))
    except TypeError as e:
        raise TypeError(f"{what} must be plain JSON (str keys, no tensors): {e}") from e


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b  # True == 1 in python; not in a config
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------------------------
# Files


def _save_tensors(
    file: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    save_file(tensors, file, metadata={"format": "pt", **(metadata or {})})
    _fsync_path(file)


def _load_tensors(
    file: Path, map_location: str | torch.device, skip: set[str] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(file, framework="pt", device=str(map_location)) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not skip or k not in skip}
        return tensors, dict(f.metadata() or {})


def _write_json(file: Path, obj: Any) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    """fsync a file or directory; a directory's fsync makes renames/creations in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------
# Directory bookkeeping


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / MANIFEST).exists() or _step_of(path) is not None


def _complete_checkpoints(root: Path) -> list[Path]:
    """Final-named checkpoint directories with a manifest, newest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _step_of(p) is not None and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: _step_of(p) or 0, reverse=True)


def _candidates(run_dir: Path) -> list[Path]:
    """Checkpoints to try, in order: the one ``latest`` names, then the others newest first."""
    root = run_dir / CHECKPOINTS_DIR
    complete = _complete_checkpoints(root)
    latest_file = root / LATEST
    if latest_file.is_file():
        named = root / latest_file.read_text().strip()
        if named in complete:
            complete.remove(named)
            complete.insert(0, named)
        else:
            logger.warning("%s names %s, which is not a complete checkpoint", latest_file, named)
    return complete


def _newest_verified(run_dir: Path) -> Path:
    candidates = _candidates(run_dir)
    if not candidates:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / CHECKPOINTS_DIR}")
    failures = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            logger.warning("skipping checkpoint that fails verification: %s", e)
            failures.append(str(e))
            continue
        if failures:
            logger.warning("falling back to %s", path)
        return path
    raise CheckpointError(f"no checkpoint under {run_dir} verifies:\n" + "\n".join(failures))


def _remove_stale_tmp_dirs(root: Path) -> None:
    """Remove ``.tmp-<pid>`` leftovers of crashed saves; skip those of another live process."""
    for p in root.iterdir():
        m = _TMP_RE.fullmatch(p.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        logger.warning("removing leftover %s from an interrupted save", p)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``. A doomed directory is renamed to a
    tmp name before deletion, so a crash mid-delete never leaves a half checkpoint behind."""
    older = [p for p in _complete_checkpoints(root) if (_step_of(p) or 0) <= step]
    newer = [p for p in _complete_checkpoints(root) if (_step_of(p) or 0) > step]
    if newer:
        logger.warning("checkpoints from later steps left in place: %s", [p.name for p in newer])
    for p in older[keep:]:
        doomed = root / f"{p.name}.tmp-{os.getpid()}.deleting"
        os.rename(p, doomed)
        shutil.rmtree(doomed)
        logger.info("removed old checkpoint %s", p)
