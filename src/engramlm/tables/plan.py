"""Where Engram tables live, as data: a :class:`TablePlan` applied by :func:`build_table`.

SPEC §5: the tables are the model's bulk and its cheapest bytes. A plan picks the tier (the
torchrec idea: storage and caching are plan fields, not model code):

- ``device``: one ``nn.Parameter`` beside the model (:class:`DeviceTable`, ``SparseAdam``);
- ``host``: rows in (pinned) host memory, gathered and copied ahead of use
  (:class:`OffloadedTable` over :class:`MemoryStore`, :class:`TableAdam`);
- ``disk``: rows in files under ``path`` with an in-memory cache of ``cache_mb``
  (``engramlm.tables.disk.disk_table``, an :class:`OffloadedTable` too).

:func:`convert_table` copies rows between any two backends in chunks, so a table trained on
one tier can be served from another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from engramlm.tables import fp8
from engramlm.tables.base import Table
from engramlm.tables.device import DeviceTable
from engramlm.tables.offload import MemoryStore, OffloadedTable, row_chunks

logger = logging.getLogger(__name__)

TableKind = Literal["device", "host", "disk"]
TABLE_KINDS: tuple[TableKind, ...] = ("device", "host", "disk")


@dataclass(frozen=True)
class TablePlan:
    """One placement for every Engram table of a model.

    ``path``: the folder holding disk tables (one entry per table, named by the table's
    ``name``); required for ``disk`` only. ``cache_mb``: the disk tier's in-memory row cache,
    per table.
    """

    kind: TableKind = "device"
    path: str | None = None
    cache_mb: int = 256

    def __post_init__(self) -> None:
        if self.kind not in TABLE_KINDS:
            raise ValueError(f"kind must be one of {TABLE_KINDS}, got {self.kind!r}")
        if self.kind == "disk" and not self.path:
            raise ValueError("kind='disk' needs path= (the folder for the table files)")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")


def build_table(
    plan: TablePlan,
    num_rows: int,
    dim: int,
    *,
    name: str,
    device: torch.device | str | None = None,
    init: bool = True,
) -> Table:
    """A [num_rows, dim] table placed as ``plan`` says, initialised unless ``init=False``.

    ``name`` identifies the table within a model (its file under ``plan.path`` for disk).
    ``device`` is where offloaded tables deliver rows; ``None`` follows the ids passed to
    ``lookup``; a device table is built on the CPU (or ``device``) and moves with ``model.to``.
    ``init=False`` draws nothing from the RNG and writes no rows: for a caller that then
    initialises every table itself (``EngramLM.init_weights``), so a disk table's rows are
    written once, and every tier consumes the RNG alike (same seed, same initial weights).
    """
    if num_rows < 1 or dim < 1:
        raise ValueError(f"table shape must be positive, got num_rows={num_rows}, dim={dim}")
    if plan.kind == "device":
        if init:
            table = DeviceTable(num_rows, dim)
        else:
            with torch.device("meta"):  # the constructor's normal_ draws nothing on meta
                table = DeviceTable(num_rows, dim)
            table = table.to_empty(device=torch.get_default_device())
        return table if device is None else table.to(device)
    if plan.kind == "host":
        stores = [MemoryStore(num_rows, dim) for _ in range(3)]  # weight, exp_avg, exp_avg_sq
        table = OffloadedTable(*stores, device=device)
        if init:
            table.reset_parameters()  # draws what DeviceTable's constructor draws: same RNG
        return table
    from engramlm.tables.disk import disk_table

    assert plan.path is not None  # TablePlan validates it
    Path(plan.path).mkdir(parents=True, exist_ok=True)
    return disk_table(
        Path(plan.path) / name,
        num_rows,
        dim,
        cache_bytes=plan.cache_mb << 20,
        device=device,
        init=init,
    )


@torch.no_grad()
def read_rows(table: Table, rows: Tensor) -> Tensor:
    """[n] ids -> [n, dim] float32 CPU weight rows of any backend, outside autograd."""
    return table.lookup(rows).to("cpu", torch.float32)


@torch.no_grad()
def write_rows(table: Table, rows: Tensor, values: Tensor) -> None:
    """Overwrite weight rows [n] of a device or offloaded table with [n, dim] ``values``."""
    if isinstance(table, OffloadedTable):
        table.write_rows(rows, values)
    elif isinstance(table, DeviceTable):
        weight = table.weight
        weight.index_copy_(0, rows.to(weight.device), values.to(weight.device, weight.dtype))
    else:
        raise TypeError(f"cannot write rows into a {type(table).__name__}")


@torch.no_grad()
def write_range(table: Table, start: int, values: Tensor) -> None:
    """Overwrite weight rows [start, start + n) of a device or offloaded table with [n, dim]
    ``values`` (any float dtype, any device): the bulk path for whole-table copies. An fp8
    table (``tables.fp8``) takes packed uint8 rows [n, dim + dim/32] instead."""
    if isinstance(table, OffloadedTable):
        table.write_range(start, values)
    elif isinstance(table, DeviceTable) and table.dtype == fp8.FP8:
        if values.dtype != torch.uint8 or tuple(values.shape[1:]) != (table.packed.shape[1],):
            raise ValueError(
                f"an fp8 table takes packed uint8 rows [n, {table.packed.shape[1]}] "
                f"(tables.fp8.pack_rows), got {values.dtype} {list(values.shape)}"
            )
        table.packed[start : start + values.shape[0]].copy_(values)
    elif isinstance(table, DeviceTable):
        table.weight[start : start + values.shape[0]].copy_(values)
    else:
        raise TypeError(f"cannot write rows into a {type(table).__name__}")


def convert_table(src: Table, dst: Table, *, chunk_rows: int | None = None) -> None:
    """Copy every weight row of ``src`` into ``dst`` (any backends), ``chunk_rows`` at a time
    (default ``offload.CHUNK_ROWS``).

    Only one chunk is in memory at once, so tables larger than RAM convert between disk and
    another tier. Optimiser moments are not copied: they belong to a training run.
    """
    if (src.num_rows, src.dim) != (dst.num_rows, dst.dim):
        raise ValueError(
            f"source table is [{src.num_rows}, {src.dim}], destination [{dst.num_rows}, {dst.dim}]"
        )
    for start, stop in row_chunks(src.num_rows, chunk_rows):
        write_range(dst, start, read_rows(src, torch.arange(start, stop, device=_device_of(src))))
    if isinstance(dst, OffloadedTable):
        dst.flush()
    logger.info("converted a [%d, %d] table", src.num_rows, src.dim)


def _device_of(table: Table) -> torch.device:
    if isinstance(table, DeviceTable):
        return table.weight.device
    return torch.device("cpu")
