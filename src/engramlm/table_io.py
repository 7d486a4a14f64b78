"""A run's Engram tables out of and into its checkpoints: ``engramlm tables export|import``.

SPEC §5: the tables are the model's bulk, so they travel as disk tables - one folder per
Engram layer, ``engram_layer<i>/{weight,exp_avg,exp_avg_sq}.engt`` (``tables.disk`` format),
the layout of a disk run's live ``tables/`` and of ``from_pretrained(engram_tables="disk")``'s
``table_dir`` too. An export adds ``tables.json``: the table shapes, the Engram fields that
address the rows (the hash and the table sizes) and the tokenizer's fingerprint, so an import
can refuse tables whose rows would be read at the wrong addresses.

Import is export's inverse: the weights of such a folder replace the table weights of a run's
newest good checkpoint, which is written again (same step, atomically) the way the chosen
tier stores tables - in ``model.safetensors`` for ``device``/``host``, as snapshot files for
``disk``, which never holds a table in memory. The run's Adam moments and steps are kept (an
export carries weights only), so importing a run's own export leaves the run as it was, bit
for bit, and training resumes from it on any tier.

Released checkpoints (``engramlm.hf.load_offloaded``): :func:`stream_safetensors_rows` copies a
table held as row blocks in safetensors shards (:class:`TableSource`) into any tier, a chunk at
a time, and :func:`load_table_tier` builds (atomically, fingerprinted) or reuses the host or
disk tier of a checkpoint's tables. Both are model-agnostic: a loader only names the blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engramlm.checkpoint import (
    RESERVED_KEYS,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from engramlm.model import EngramLM
from engramlm.tables import MemoryStore, OffloadedTable, RowStore, Table, TablePlan
from engramlm.tables.disk import read_table_file, verify_table_file
from engramlm.tables.offload import row_chunks
from engramlm.tables.plan import TableKind, write_range
from engramlm.train import TrainConfig, build_optimizers, build_run_model, check_run_dir

logger = logging.getLogger(__name__)

MANIFEST = "tables.json"
# What a row's address depends on (SPEC §2.2-2.3): the hash and the table sizes. The gate, the
# short conv and the branches read rows but do not move them.
ADDRESSING_FIELDS = (
    "table_sizes",
    "max_ngram",
    "heads_per_ngram",
    "embed_dim_per_ngram",
    "layer_ids",
    "pad_id",
    "seed",
)


def export_tables(run_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[Path]:
    """Write a run's Engram tables (its last good checkpoint) as disk tables under ``out``.

    One folder per Engram layer, ``out/engram_layer<i>``, readable with
    ``engramlm.tables.disk.disk_table(path, ..., create=False)`` to serve the model's tables
    from disk (SPEC §5), plus ``out/tables.json``. The tables are written row chunk by row
    chunk as the checkpoint loads. The moment files hold the checkpoint's moments for a
    disk-trained run and zeros otherwise; :func:`import_tables` reads only the weights.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; export into a new folder")
    model, _, configs = build_run_model(run_dir, tables=TablePlan("disk", path=str(out)))
    try:
        state = load_checkpoint(run_dir, model=model, optimizers={}, restore_rng=False)
    finally:
        model.close_tables()  # flushes and records each file's checksum
    tables = _tables(model)
    manifest = {
        "engram": {k: configs["model"]["engram"][k] for k in ADDRESSING_FIELDS},
        "tokenizer_fingerprint": configs.get("tokenizer_fingerprint"),
        "tables": {name: [t.num_rows, t.dim] for name, t in tables.items()},
        "source": {"run": str(run_dir), "step": state["step"]},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("exported %d tables from %s to %s", len(tables), run_dir, out)
    return [out / name for name in tables]


def import_tables(
    run_dir: str | os.PathLike[str],
    tables_dir: str | os.PathLike[str],
    *,
    storage: TableKind | None = None,
) -> Path:
    """Put the table weights under ``tables_dir`` into the newest good checkpoint of a run.

    ``tables_dir`` holds one ``engram_layer<i>/weight.engt`` per Engram layer of the run (an
    export, or a disk-tier table folder). ``storage`` (default: the run's ``table_storage``)
    is how the rewritten checkpoint stores the tables, recorded as the run's
    ``train.table_storage``. Everything is checked before anything is written: the Engram
    config and tokenizer recorded in ``tables.json`` (when there is one), the set of layers,
    each table's shape and dtype (float32), then each file's integrity (truncation, header, a
    clean close, an empty journal, the data checksum: one more read of the rows).
    -> the checkpoint directory.
    """
    run, source = check_run_dir(run_dir), Path(tables_dir)
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text())["train"])
    cfg = dataclasses.replace(cfg, table_storage=storage or cfg.table_storage)
    with contextlib.ExitStack() as stack:
        live = None  # disk tables of the model being rewritten: scratch files in the run
        if cfg.table_storage == "disk":
            live = stack.enter_context(tempfile.TemporaryDirectory(dir=run, prefix=".import-"))
        # The checkpoint's RNG state passes through the globals on its way back into the file.
        stack.callback(restore_rng_state, capture_rng_state())
        plan = TablePlan(cfg.table_storage, path=live, cache_mb=cfg.table_cache_mb)
        model, _, configs = build_run_model(run, tables=plan)
        stack.callback(model.close_tables)
        rows = _checked_source(source, model, configs)
        optimizers = build_optimizers(model, cfg)
        state = load_checkpoint(run, model=model, optimizers=optimizers)
        for name, table in _tables(model).items():
            for start, stop in row_chunks(table.num_rows):
                write_range(table, start, rows[name][start:stop])
        record = state["config"]
        record["train"]["table_storage"] = cfg.table_storage
        path = save_checkpoint(
            run,
            state["step"],
            model=model,
            optimizers=optimizers,
            trainer_state={k: v for k, v in state.items() if k not in RESERVED_KEYS},
            config=record,
            tokenizer_fingerprint=state["tokenizer_fingerprint"],
            keep=cfg.keep_checkpoints,
        )
    configs["train"]["table_storage"] = cfg.table_storage
    (run / "config.json").write_text(json.dumps(configs, indent=2))
    logger.info("imported %d tables from %s into %s (%s)", len(rows), source, path, plan.kind)
    return path


def _tables(model: EngramLM) -> dict[str, Table]:
    """The model's Engram tables by folder name (``build_table``'s ``name``), in layer order."""
    tables = {f"engram_layer{b.layer_id}": b.engram.table for b in model.layers if b.engram}
    if not tables:
        raise ValueError("the run's model has no Engram layers (model.engram is None): no tables")
    return tables


def _checked_source(source: Path, model: EngramLM, configs: dict[str, Any]) -> dict[str, Tensor]:
    """{folder name: [num_rows, dim] float32 weights, mapped} of ``source``, checked against the
    run's model; raises ``ValueError`` (``TableFileError`` for a damaged file) naming the
    problem and the fix."""
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder of Engram tables")
    manifest = source / MANIFEST
    if manifest.is_file():
        _check_manifest(manifest, configs)
    else:
        logger.warning(
            "%s has no %s (not written by `engramlm tables export`): only the table shapes are "
            "checked, not the Engram config or tokenizer the rows were trained with",
            source,
            MANIFEST,
        )
    tables = _tables(model)
    found = sorted(p.name for p in source.iterdir() if (p / "weight.engt").is_file())
    if found != sorted(tables):
        hint = (
            "it is one table's folder; pass the folder that holds the engram_layer<i> folders"
            if (source / "weight.engt").is_file()
            else "import tables exported from a run with the same model.engram.layer_ids"
        )
        raise ValueError(
            f"{source} holds tables {found}, the run's Engram layers need {sorted(tables)}: {hint}"
        )
    rows = {}
    for name, table in tables.items():
        file = source / name / "weight.engt"
        values = read_table_file(file)  # the header only: a wrong shape is refused at once
        if tuple(values.shape) != (table.num_rows, table.dim):
            raise ValueError(
                f"{file} is {list(values.shape)}, the run's {name} table is "
                f"[{table.num_rows}, {table.dim}] (rows: its heads' primes from "
                "model.engram.table_sizes; width: embed_dim_per_ngram / heads_per_ngram): the "
                "tables come from another Engram config; import them into a run with the same one"
            )
        if values.dtype != torch.float32:  # every tier trains float32 rows
            raise ValueError(
                f"{file} stores {values.dtype} rows, the run's tables are float32 and import "
                "copies rows bit for bit: write the tables as float32 (as `engramlm tables "
                "export` does)"
            )
        rows[name] = values
    for name in rows:  # every table fits: now read each once to check its data checksum
        verify_table_file(source / name / "weight.engt")
    return rows


def _check_manifest(manifest: Path, configs: dict[str, Any]) -> None:
    saved = json.loads(manifest.read_text())
    ours = {
        **{f"model.engram.{k}": configs["model"]["engram"][k] for k in ADDRESSING_FIELDS},
        "tokenizer_fingerprint": configs.get("tokenizer_fingerprint"),
    }
    theirs = {
        **{f"model.engram.{k}": saved["engram"].get(k) for k in ADDRESSING_FIELDS},
        "tokenizer_fingerprint": saved.get("tokenizer_fingerprint"),
    }
    diffs = [f"{k}: tables {theirs[k]!r}, run {ours[k]!r}" for k in ours if theirs[k] != ours[k]]
    if diffs:
        raise ValueError(
            f"{manifest}: the tables were trained with another Engram hash or tokenizer, so "
            "their rows would be read at the wrong addresses:\n  " + "\n  ".join(diffs) + "\n"
            "import them into a run with the same model.engram fields and tokenizer"
        )


# --------------------------------------------------------------------------------------------
# Tables of released checkpoints: rows streamed from safetensors shards into a tier
# --------------------------------------------------------------------------------------------

TIER_MANIFEST = "tier.json"
TIER_FORMAT = 1
DEFAULT_CACHE_ROWS = 1 << 16  # disk tier: rows of RAM cache per table (e.g. 8 MiB at dim 32)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "U8": torch.uint8,
    "I64": torch.int64,
}
SHARD_INDEX = "model.safetensors.index.json"
# Stored dtypes a float table tier reads (fp8 tables go through stream_fp8_table_rows).
_FLOAT_DTYPES = ("F32", "BF16", "F16")


@dataclasses.dataclass(frozen=True)
class TableSource:
    """Where one table's rows are in a safetensors checkpoint: the row blocks ``parts``
    (shard file, tensor name), concatenated in order along dim 0, make [num_rows, dim].

    A released model may split one table into many tensors (Qwen4-Exp's ``split_ngram_parts``)
    spread over many shard files; ``name`` is the table's folder in a disk tier.
    """

    name: str
    parts: tuple[tuple[Path, str], ...]
    num_rows: int
    dim: int


def checkpoint_tensors(model_dir: str | os.PathLike[str]) -> dict[str, tuple[Path, list[int], str]]:
    """{tensor name: (shard file, shape, safetensors dtype)} of a model folder's checkpoint,
    reading headers only (:func:`safetensors_index`: a missing or truncated shard is named)."""
    return {
        name: (loc.path, list(loc.shape), loc.dtype)
        for name, loc in safetensors_index(model_dir).items()
    }


def source_dtype(source: TableSource) -> str:
    """The safetensors dtype of a table's parts, after checking every part's shard (present,
    complete) and that their shapes add up to [num_rows, dim]; errors name the problem."""
    paths = {path for path, _ in source.parts}  # a shard holds many parts: read each header once
    shards = {path: {t.name: t for t in _shard_tensors(path)} for path in paths}
    missing = [f"{path.name}:{key}" for path, key in source.parts if key not in shards[path]]
    if missing:
        raise ValueError(
            f"table {source.name}: tensors {missing[:4]} are missing from their shards"
        )
    infos = [shards[path][key] for path, key in source.parts]
    shapes = [info.shape for info in infos]
    dtypes = {info.dtype for info in infos}
    rows = sum(s[0] for s in shapes)
    dims = {s[1] if len(s) == 2 else None for s in shapes}
    if dims != {source.dim} or rows != source.num_rows:
        raise ValueError(
            f"table {source.name} is [{rows}, {', '.join(map(str, dims))}] in the checkpoint "
            f"({len(shapes)} parts), the config says [{source.num_rows}, {source.dim}]: the "
            "checkpoint and config.json disagree (a config edited or from another model?)"
        )
    if len(dtypes) != 1 or not dtypes <= set(_FLOAT_DTYPES):
        raise ValueError(
            f"table {source.name} is stored as {sorted(dtypes)}; engramlm's tiers read one of "
            f"{sorted(_FLOAT_DTYPES)}"
        )
    return dtypes.pop()


def stream_safetensors_rows(
    source: TableSource, table: Table, *, chunk_rows: int | None = None
) -> None:
    """Copy a table's rows from its safetensors parts into ``table`` (any tier), ``chunk_rows``
    at a time (default ``offload.CHUNK_ROWS``): no whole table, nor a whole part, is ever held
    in memory. Rows are written as they are stored, upcast to the tier's float type."""
    from safetensors import safe_open

    if (table.num_rows, table.dim) != (source.num_rows, source.dim):
        raise ValueError(
            f"table {source.name} is [{source.num_rows}, {source.dim}], the tier's "
            f"[{table.num_rows}, {table.dim}]"
        )
    start = 0
    for path, key in source.parts:
        with safe_open(str(path), framework="pt") as f:
            part = f.get_slice(key)
            rows = part.get_shape()[0]
            for lo, hi in row_chunks(rows, chunk_rows):
                write_range(table, start + lo, part[lo:hi].float())
        start += rows
    if start != source.num_rows:  # our invariant: callers check shapes with source_dtype
        raise ValueError(f"table {source.name}: {start} rows streamed, {source.num_rows} expected")


def source_fingerprint(sources: list[TableSource], dtype: str) -> dict[str, Any]:
    """What a disk tier's rows were made from: each table's shape, the stored dtype, and every
    part's file (name, size, modification time) and tensor name."""
    return {
        "dtype": dtype,
        "tables": {
            s.name: {
                "shape": [s.num_rows, s.dim],
                "parts": {
                    key: {
                        "file": path.name,
                        "bytes": path.stat().st_size,
                        "mtime_ns": path.stat().st_mtime_ns,
                    }
                    for path, key in s.parts
                },
            }
            for s in sources
        },
    }


def serving_table(store: RowStore, device: torch.device | str | None = None) -> OffloadedTable:
    """A read-only :class:`OffloadedTable` serving ``store``'s rows: no Adam moment stores (a
    released model is not trained here; zero-filled moments would triple a host tier's memory),
    so an optimiser or a write is refused."""
    return OffloadedTable(store, device=device)


def load_table_tier(
    model_dir: str | os.PathLike[str],
    sources: list[TableSource],
    *,
    kind: str,
    table_dir: str | os.PathLike[str] | None = None,
    cache_rows: int | None = None,
    identity: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, OffloadedTable]:
    """Serve a checkpoint's tables from a tier: {source name: read-only table}.

    ``kind="host"``: float32 rows in RAM, streamed from the shards at every load.
    ``kind="disk"``: rows in files under ``table_dir`` (default
    :func:`default_table_dir`), stored in the checkpoint's dtype, with ``cache_rows`` rows of
    RAM cache per table. The folder is built once, atomically (in a ``.partial`` sibling
    renamed into place when complete; removed on any failure, a full disk included), with
    ``tier.json`` recording the sources' fingerprint and ``identity`` (what the rows mean: the
    model type and hash config). A later load reuses it when both match and refuses it,
    naming the difference, when they do not.
    """
    dtypes = {source_dtype(s) for s in sources}
    dtype = dtypes.pop() if len(dtypes) == 1 else "F32"
    if kind == "host":
        if table_dir is not None:
            raise ValueError(
                'table_dir= is for engram_tables="disk"; the host tier keeps rows in RAM'
            )
        tables = {}
        for s in sources:
            table = serving_table(MemoryStore(s.num_rows, s.dim), device)
            stream_safetensors_rows(s, table)
            tables[s.name] = table
        return tables
    if kind != "disk":
        raise ValueError(f"engram_tables must be 'host' or 'disk', got {kind!r}")
    from engramlm.tables.disk import _ROW_OVERHEAD_BYTES, DiskStore

    directory = Path(table_dir) if table_dir is not None else default_table_dir(model_dir)
    manifest = {
        "format": TIER_FORMAT,
        "identity": identity or {},
        **source_fingerprint(sources, dtype),
    }
    if not directory.exists() or not any(directory.iterdir()):  # absent, or made empty
        _build_disk_tier(directory, sources, manifest, SAFETENSORS_DTYPES[dtype])
    _check_tier(directory, manifest)
    rows = DEFAULT_CACHE_ROWS if cache_rows is None else cache_rows
    if rows < 0:
        raise ValueError(f"cache_rows must be >= 0, got {cache_rows}")
    tables = {}
    for s in sources:
        store = DiskStore.open(
            directory / s.name / "weight.engt", cache_bytes=rows * (4 * s.dim + _ROW_OVERHEAD_BYTES)
        )
        tables[s.name] = serving_table(store, device)
    logger.info("serving %d tables from the disk tier %s", len(tables), directory)
    return tables


def default_table_dir(model_dir: str | os.PathLike[str]) -> Path:
    """``$XDG_CACHE_HOME/engramlm/tables/<folder name>-<hash of its absolute path>``."""
    import hashlib

    resolved = Path(model_dir).resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "engramlm" / "tables" / f"{resolved.name}-{digest}"


def _check_tier(directory: Path, expected: dict[str, Any]) -> None:
    path = directory / TIER_MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{directory} exists but is not a complete engramlm table tier (no {TIER_MANIFEST}); "
            "remove it or pass another table_dir="
        )
    saved = json.loads(path.read_text())
    diffs = _diff(saved, expected)
    if diffs:
        raise ValueError(
            f"the table tier {directory} was built from other tables than this model's, so it "
            "is not used:\n  " + "\n  ".join(diffs[:8]) + "\nremove it to rebuild it, or pass "
            "another table_dir="
        )


def _diff(saved: Any, expected: Any, where: str = "") -> list[str]:
    """Human-readable differences between two JSON values (``where`` is the path so far)."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(saved) | set(expected), key=str):
            out += _diff(saved.get(key), expected.get(key), f"{where}.{key}" if where else key)
        return out
    if saved != expected:
        return [f"{where}: tier {saved!r}, model {expected!r}"]
    return []


def _build_disk_tier(
    directory: Path, sources: list[TableSource], manifest: dict[str, Any], dtype: torch.dtype
) -> None:
    """Write the tier into a ``.partial`` sibling, then rename it into place; nothing is left
    behind on failure."""
    import errno
    import shutil

    from engramlm.tables.disk import DiskStore

    directory.parent.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    needed = sum(s.num_rows * s.dim * itemsize + (1 << 16) for s in sources)
    free = shutil.disk_usage(directory.parent).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"the table tier needs {needed / 1e9:.2f} GB, {directory.parent} has "
            f"{free / 1e9:.2f} GB free: free space or pass table_dir= on a larger disk",
        )
    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # left by a crashed load of this process id
    try:
        for s in sources:
            (partial / s.name).mkdir(parents=True)
            store = DiskStore.create(
                partial / s.name / "weight.engt", s.num_rows, s.dim, dtype=dtype, cache_bytes=0
            )
            try:
                stream_safetensors_rows(s, serving_table(store))
            finally:
                store.close()  # records the data checksum
        tmp = partial / (TIER_MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, partial / TIER_MANIFEST)
        try:
            os.rename(partial, directory)
        except OSError:
            if not directory.exists():
                raise
            # Another process built it meanwhile: keep theirs (the caller checks it).
            shutil.rmtree(partial, ignore_errors=True)
            return
        fd = os.open(directory.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"disk full while writing the table tier {directory} (needs "
                f"{needed / 1e9:.2f} GB); the partial tier was removed: free space or pass "
                "table_dir= on a larger disk",
            ) from e
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("built the disk tier %s (%.2f GB)", directory, needed / 1e9)


# --- tables streamed out of safetensors shards ---------------------------------------------------
# A released checkpoint's tables (DeepSeek-V4.1's ~98 GB each) are larger than memory: their rows
# go from the shard files into a tier chunk by chunk, never whole. Shard headers are parsed and
# checked here (not by ``safetensors``' loader) so that a truncated shard or a tensor of the wrong
# dtype or shape is refused, by name, before any row is copied.


@dataclasses.dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors shard: ``nbytes`` from byte ``offset``."""

    name: str
    path: Path
    dtype: str  # the safetensors spelling, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"{self.name} in {self.path.name} has dtype {self.dtype}, which engramlm does not "
                f"read (known: {sorted(SAFETENSORS_DTYPES)})"
            )
        return SAFETENSORS_DTYPES[self.dtype]

    def read(self, start_row: int = 0, stop_row: int | None = None) -> Tensor:
        """Rows [start_row, stop_row) of the tensor (all of it by default), read from the file."""
        rows = self.shape[0] if self.shape else 1
        stop_row = rows if stop_row is None else stop_row
        row_bytes = self.nbytes // rows if rows else 0
        length = (stop_row - start_row) * row_bytes
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), length, self.offset + start_row * row_bytes)
        if len(data) != length:
            raise ValueError(
                f"{self.path}: short read of {self.name} ({len(data)} of {length} bytes): the "
                "shard is truncated; download it again"
            )
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if length else None
        shape = (stop_row - start_row, *self.shape[1:]) if self.shape else ()
        if flat is None:
            return torch.empty(shape, dtype=self.torch_dtype)
        return flat.view(self.torch_dtype).reshape(shape)


def safetensors_index(checkpoint_dir: str | os.PathLike[str]) -> dict[str, TensorLocation]:
    """{tensor name: location} of every tensor in a checkpoint folder's safetensors shards.

    Reads ``model.safetensors.index.json`` when there is one (and checks that every shard it
    names exists and holds the tensors it says), else every ``*.safetensors`` in the folder.
    Each shard header is validated: a tensor whose bytes run past the end of its file (a
    truncated shard), a byte count that does not match its dtype and shape, or a header that is
    not JSON raises ``ValueError`` naming the shard, the tensor and the fix.
    """
    directory = Path(checkpoint_dir)
    index_file = directory / SHARD_INDEX
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        weight_map = {}
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{directory}: no safetensors shards (*.safetensors) and no index")
    locations: dict[str, TensorLocation] = {}
    for shard in shards:
        path = directory / shard
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint shard {path} is missing (a shard named by {index_file.name}): "
                "download it again"
            )
        for loc in _shard_tensors(path):
            locations[loc.name] = loc
    for name, shard in weight_map.items():
        if name not in locations or locations[name].path.name != shard:
            raise ValueError(
                f"{index_file}: maps {name} to {shard}, but that shard does not hold it; the "
                "index and the shards come from different downloads"
            )
    return locations


def _shard_tensors(path: Path) -> list[TensorLocation]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors shard; truncated")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise ValueError(
                f"{path}: header of {header_len} bytes runs past the end of the {size}-byte file; "
                "the shard is truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from e
    data_start = 8 + header_len
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        shape = tuple(int(x) for x in entry["shape"])
        loc = TensorLocation(name, path, entry["dtype"], shape, data_start + begin, end - begin)
        if data_start + end > size:
            raise ValueError(
                f"checkpoint shard {path} is truncated: {name} ends at byte {data_start + end}, "
                f"the file has {size} bytes; download it again"
            )
        if entry["dtype"] in SAFETENSORS_DTYPES:
            expected = math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize
            if expected != loc.nbytes:
                raise ValueError(
                    f"{path}: {name} is {entry['dtype']} {list(shape)} ({expected} bytes) but "
                    f"its data offsets span {loc.nbytes} bytes: corrupt header"
                )
        out.append(loc)
    return out


def stream_fp8_table_rows(
    table: Table, weight: TensorLocation, scale: TensorLocation, *, chunk_rows: int = 1 << 18
) -> None:
    """Copy an fp8 table from safetensors shards into ``table`` (any tier, ``dtype`` fp8),
    ``chunk_rows`` rows at a time, bytes unchanged (``tables.fp8`` packed rows).

    ``weight`` is float8_e4m3fn [num_rows, dim] and ``scale`` float8_e8m0fnu [num_rows, dim/32]
    (one scale per 32 values of a row: DeepSeek-V4.1's ``embed.weight``/``embed.scale``). Both
    are checked against the table first; memory stays at one chunk (~70 MB at dim 256).
    """
    from engramlm.tables import fp8

    dim = table.dim
    expect = {
        weight.name: ("F8_E4M3", (table.num_rows, dim)),
        scale.name: ("F8_E8M0", (table.num_rows, dim // fp8.BLOCK)),
    }
    for loc in (weight, scale):
        dtype, shape = expect[loc.name]
        if (loc.dtype, loc.shape) != (dtype, shape):
            hint = (
                f"one E8M0 scale per {fp8.BLOCK} values of a row"
                if loc is scale
                else "fp8 e4m3 rows"
            )
            raise ValueError(
                f"{loc.name} ({loc.path.name}) is {loc.dtype} {list(loc.shape)}, the table needs "
                f"{dtype} {list(shape)} ({hint})"
            )
    for start, stop in row_chunks(table.num_rows, chunk_rows):
        packed = fp8.pack_rows(weight.read(start, stop), scale.read(start, stop))
        write_range(table, start, packed)
    if isinstance(table, OffloadedTable):
        table.flush()
    logger.info(
        "streamed %s [%d, %d] fp8 into a %s", weight.name, table.num_rows, dim, type(table).__name__
    )


def fp8_table_source(weight: TensorLocation, scale: TensorLocation) -> dict[str, Any]:
    """What identifies the rows :func:`stream_fp8_table_rows` copies from ``weight``/``scale``:
    per tensor its shard's name and size, byte range, dtype, shape and a CRC32 of its first and
    last MiB. Recorded beside a disk table once it is complete, so a later load can serve the
    table instead of copying it again (DeepSeek-V4.1's are ~100 GB) and refuse one copied from
    other bytes. A cheap fingerprint, not a full checksum: reading 100 GB is what it avoids."""
    out: dict[str, Any] = {"format": "fp8 e4m3 rows + E8M0 scales per 32 values, packed"}
    for role, loc in (("weight", weight), ("scale", scale)):
        edge = min(loc.nbytes, 1 << 20)
        with open(loc.path, "rb") as f:
            head = os.pread(f.fileno(), edge, loc.offset)
            tail = os.pread(f.fileno(), edge, loc.offset + loc.nbytes - edge)
        out[role] = {
            "name": loc.name,
            "shard": loc.path.name,
            "shard_bytes": loc.path.stat().st_size,
            "offset": loc.offset,
            "nbytes": loc.nbytes,
            "dtype": loc.dtype,
            "shape": list(loc.shape),
            "edge_crc32": [zlib.crc32(head), zlib.crc32(tail)],
        }
    return out
