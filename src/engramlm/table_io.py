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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
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
from engramlm.tables import Table, TablePlan
from engramlm.tables.disk import read_table_file, verify_table_file
from engramlm.tables.offload import row_chunks
from engramlm.tables.plan import TableKind, write_range
from engramlm.train import TrainConfig, build_optimizers, build_run_model

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
    run, source = Path(run_dir), Path(tables_dir)
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
