"""Tables whose rows live outside autograd - host memory, disk - trained with sparse row updates.

SPEC §5: the hash ids are known from the token ids before the forward, so the rows a layer will
read can be gathered from host DRAM (or NVMe) while earlier blocks compute.

An :class:`OffloadedTable` keeps three row stores in one tier: the weights and, row-aligned, the
two Adam moments. ``lookup`` gathers the addressed rows (from a finished :meth:`prefetch` when
one matches), delivers them to the compute device and records the rows; backward hands the row
gradients to the table, and :class:`TableAdam` then reads, updates and writes back only the
addressed rows and their moments. The arithmetic is ``torch.optim.SparseAdam``'s, operation for
operation, on the same coalesced gradient, so a step is bitwise identical (fp32) to an
in-memory :class:`~engramlm.tables.DeviceTable` trained with ``SparseAdam``.

Checkpoints: the weights appear in the module's state dict under ``weight`` (the key a
``DeviceTable`` uses, so a model file does not depend on the backend) and the moments in
``TableAdam.state_dict()`` (SparseAdam's layout), but only for stores resident in memory
(:class:`MemoryStore`). File-backed stores (:class:`FileRowStore`, the disk tier) are too big
for a state dict and keep changing after a checkpoint: ``engramlm.checkpoint`` copies their
files into the checkpoint (:meth:`OffloadedTable.save_files`) and copies them back on resume
(:meth:`OffloadedTable.load_files`).

A backend only implements :class:`RowStore` (read and write rows by id; reads may come from
the prefetch thread while the main thread reads too); caching, pinning, files and journals are
its business.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from engramlm.tables import fp8
from engramlm.tables.base import TABLE_INIT_STD
from engramlm.tables.hugepages import use_huge_pages

logger = logging.getLogger(__name__)

# Rows per chunk when a whole table is streamed (init, load, conversion): ~64 MiB of fp32 at
# dim 64. Chunked ``normal_`` equals one call over the table (so host and device tables
# initialise alike) when every chunk but the last is a multiple of 16 values and the last has at
# least 16: torch draws normals in blocks of 16 and redraws a short tail block.
CHUNK_ROWS = 1 << 18


@runtime_checkable
class RowStore(Protocol):
    """[num_rows, dim] float32 rows addressed by id, in some tier (host memory, disk, ...)."""

    num_rows: int
    dim: int

    def read(self, rows: Tensor) -> Tensor:
        """[n] int64 CPU ids -> a new [n, dim] float32 CPU tensor."""
        ...

    def write(self, rows: Tensor, values: Tensor) -> None:
        """Store [n, dim] ``values`` at [n] distinct ids."""
        ...

    def flush(self) -> None:
        """Make every write durable (a no-op for memory)."""
        ...

    def write_range(self, start: int, values: Tensor) -> None:
        """Store [n, dim] ``values`` at rows [start, start + n): bulk initialisation/import."""
        ...

    def zero_(self) -> None:
        """Set every row to zero (fresh Adam moments)."""
        ...


@runtime_checkable
class FileRowStore(RowStore, Protocol):
    """A :class:`RowStore` whose rows live in a file that outlives the process (the disk tier).

    Its file keeps changing as training goes on, so a checkpoint copies it (``snapshot``) and a
    resume copies the checkpoint's copy back (``restore``).
    """

    path: Path

    def snapshot(self, dest: Path) -> int:
        """Copy the current rows into the new file ``dest`` -> its data checksum."""
        ...

    def restore(self, snapshot: Path) -> None:
        """Make every row what it is in ``snapshot``."""
        ...

    def warm(self, rows: Tensor) -> None:
        """A hint that [n] ids will be read soon: start reading their file pages."""
        ...

    def close(self) -> None:
        """Flush, record the file's checksum, release it."""
        ...


class MemoryStore:
    """Rows in one CPU tensor - pinned when CUDA is available, so copies can be asynchronous.

    ``dtype=torch.float8_e4m3fn`` holds fp8 rows with their E8M0 scales as packed uint8 rows
    [num_rows, dim + dim/32] (``tables.fp8``), dequantised by ``read``; such a store is filled
    by ``write_range`` with packed rows and is otherwise read-only.
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        pin: bool | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        pin = torch.cuda.is_available() if pin is None else pin
        if dtype not in (torch.float32, fp8.FP8):
            raise ValueError(f"MemoryStore holds float32 or float8_e4m3fn rows, got {dtype}")
        self.num_rows, self.dim, self.dtype = num_rows, dim, dtype
        width = fp8.packed_width(dim) if dtype == fp8.FP8 else dim
        storage = torch.uint8 if dtype == fp8.FP8 else torch.float32
        # Explicitly CPU: host rows stay on the host even when the model is built on "meta".
        self.data = torch.empty(num_rows, width, dtype=storage, device="cpu", pin_memory=pin)
        if not pin:  # pinned memory comes from the CUDA driver, not from ordinary pages
            use_huge_pages(self.data)  # before the zeros below touch the pages
        self.data.zero_()

    def read(self, rows: Tensor) -> Tensor:
        if self.dtype == fp8.FP8:
            return fp8.dequantize_rows(self.data.index_select(0, rows), self.dim)
        return self.data.index_select(0, rows)

    def write(self, rows: Tensor, values: Tensor) -> None:
        _check_writable(self)
        self.data.index_copy_(0, rows, values)

    def write_range(self, start: int, values: Tensor) -> None:
        _check_range_values(self, values)
        self.data[start : start + values.shape[0]].copy_(values)

    def zero_(self) -> None:
        self.data.zero_()

    def flush(self) -> None:
        """Memory is as durable as it gets."""


def _check_writable(store: RowStore) -> None:
    if getattr(store, "dtype", torch.float32) == fp8.FP8:
        raise TypeError(
            "fp8 tables are read-only (serving; training fp8 tables is not supported): their "
            "rows come from a checkpoint, written whole with write_range as packed rows"
        )


def _check_range_values(store: RowStore, values: Tensor) -> None:
    """fp8 stores take packed uint8 rows [n, dim + dim/32]; float stores, float rows [n, dim]."""
    packed = getattr(store, "dtype", torch.float32) == fp8.FP8
    width = fp8.packed_width(store.dim) if packed else store.dim
    if packed != (values.dtype == torch.uint8) or values.dim() != 2 or values.shape[1] != width:
        want = f"packed uint8 rows [n, {width}] (tables.fp8.pack_rows)" if packed else "float rows"
        raise ValueError(
            f"a {getattr(store, 'dtype', torch.float32)} store of width {store.dim} takes {want}, "
            f"got {values.dtype} {list(values.shape)}"
        )


def resident(store: RowStore) -> Tensor | None:
    """The whole [num_rows, dim] tensor of a store held in memory, else ``None``."""
    if isinstance(store, MemoryStore) and store.dtype != fp8.FP8:
        return store.data
    return None


def row_chunks(num_rows: int, chunk_rows: int | None = None) -> Iterable[tuple[int, int]]:
    """[0, num_rows) as consecutive (start, stop) ranges of at most ``chunk_rows`` rows."""
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    for start in range(0, num_rows, chunk_rows):
        yield start, min(start + chunk_rows, num_rows)


class _Lookup(torch.autograd.Function):
    """Identity on the gathered rows; backward hands the row gradients to the table.

    ``anchor`` is a 0-element leaf that requires grad: it puts the lookup on the autograd tape
    although the rows themselves are plain tensors.
    """

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, values: Tensor, rows: Tensor, table: Any) -> Tensor:
        ctx.rows, ctx.table = rows, table
        return values

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None, None]:
        ctx.table.pending.append((ctx.rows, grad.detach()))
        return None, None, None, None


@dataclass
class _Prefetch:
    rows: Tensor  # [n] int64 CPU, compared by value at lookup
    device: torch.device
    future: Future[tuple[Tensor, Any]] | _Ready  # -> ([n, dim] rows on ``device``, event|None)


class _Ready:
    """A prefetch that finished at once (cached rows): ``result()`` as a Future's, without the
    Future's condition variable (a third of the cached decode path's bookkeeping)."""

    __slots__ = ("value",)

    def __init__(self, value: tuple[Tensor, Any]) -> None:
        self.value = value

    def result(self) -> tuple[Tensor, Any]:
        return self.value


# Up to this many rows a cached read checks them for repeats in Python instead of sorting them
# (torch.unique + index_select: two operators, ~10-20 us on a decode step's cold caches).
_FEW_ROWS = 256


class OffloadedTable(nn.Module):
    """A :class:`~engramlm.tables.Table` over row stores; see the module docstring.

    Rows are delivered to ``device``, or, when it is ``None``, to the device of the ids passed
    to ``lookup`` (the model's device: hash ids live beside the activations).

    ``prefetch(rows)`` gathers on a background thread; on CUDA it gathers into pinned memory
    and issues the host-to-device copy on a dedicated stream, recording an event that
    ``lookup`` makes the current stream wait on. ``lookup`` takes a prefetch only if its rows
    are equal by value (so one batch's rows are never handed to another); a hit also discards
    the prefetches issued before it (the caller has moved past them), at most
    ``max_prefetches`` are kept, and any write to the table (an optimiser step, a load)
    waits for and discards all of them, so a prefetch never returns rows older than a write.

    Without moment stores (``exp_avg=exp_avg_sq=None``) the table is read-only, for serving:
    lookups are not recorded for a backward and :class:`TableAdam` refuses it. fp8 weight
    stores (``tables.fp8``) are always served so.
    """

    def __init__(
        self,
        weight: RowStore,
        exp_avg: RowStore | None = None,
        exp_avg_sq: RowStore | None = None,
        *,
        device: torch.device | str | None = None,
        max_prefetches: int = 4,
    ) -> None:
        super().__init__()
        if (exp_avg is None) != (exp_avg_sq is None):
            raise ValueError("pass both Adam moment stores (trainable) or neither (read-only)")
        if exp_avg is not None and getattr(weight, "dtype", torch.float32) == fp8.FP8:
            raise ValueError(
                "fp8 tables are read-only (serving; training fp8 tables is not supported): "
                "build the OffloadedTable without moment stores"
            )
        for store in () if exp_avg is None else (exp_avg, exp_avg_sq):
            if (store.num_rows, store.dim) != (weight.num_rows, weight.dim):
                raise ValueError(
                    f"moment store is [{store.num_rows}, {store.dim}] but the weights are "
                    f"[{weight.num_rows}, {weight.dim}]; stores must be row-aligned"
                )
        if max_prefetches < 1:
            raise ValueError(f"max_prefetches must be >= 1, got {max_prefetches}")
        self.weight_store, self.exp_avg, self.exp_avg_sq = weight, exp_avg, exp_avg_sq
        self.num_rows, self.dim = weight.num_rows, weight.dim
        self.device = None if device is None else torch.device(device)
        self.max_prefetches = max_prefetches
        # Not a registered parameter: the table has no dense parameters for an optimiser.
        self._anchor = torch.zeros(0, device="cpu", requires_grad=True)
        self.step_count = 0  # TableAdam's step (bias correction), saved in its state dict
        self.pending: list[tuple[Tensor, Tensor]] = []  # (rows [n], grad [*, dim]) per lookup
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._prefetched: list[_Prefetch] = []
        self._copy_streams: dict[torch.device, Any] = {}
        self.prefetch_hits = self.prefetch_misses = 0  # lookups served by a prefetch, or not
        self._closed = False

    @property
    def read_only(self) -> bool:
        """Whether the table has no Adam moments: served, never trained."""
        return self.exp_avg is None

    @property
    def stores(self) -> tuple[RowStore, ...]:
        """The weight store, then the two moment stores of a trainable table."""
        if self.exp_avg is None or self.exp_avg_sq is None:
            return (self.weight_store,)
        return self.weight_store, self.exp_avg, self.exp_avg_sq

    @property
    def num_prefetched(self) -> int:
        """Prefetches waiting for their lookup (bounded by ``max_prefetches``)."""
        with self._lock:
            return len(self._prefetched)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Rows N(0, TABLE_INIT_STD^2), moments zero, written in chunks (tables may exceed RAM).

        Draws the same numbers as ``DeviceTable.reset_parameters`` from the same RNG state.
        """
        self._check_trainable()
        self._invalidate()
        chunks = list(row_chunks(self.num_rows))
        if len(chunks) > 1 and (chunks[-1][1] - chunks[-1][0]) * self.dim < 16:
            chunks[-2:] = [(chunks[-2][0], chunks[-1][1])]  # see CHUNK_ROWS
        for start, stop in chunks:
            values = torch.empty(stop - start, self.dim, device="cpu")
            nn.init.normal_(values, std=TABLE_INIT_STD, generator=generator)
            self.weight_store.write_range(start, values)
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.step_count = 0

    def _check_trainable(self) -> None:
        if self.read_only:
            raise TypeError(
                f"{self.extra_repr()}: a read-only table (no Adam moments; fp8 tables are always "
                "read-only) is served, not trained or initialised"
            )

    # --- the Table interface -----------------------------------------------------------------
    def prefetch(self, rows: Tensor) -> None:
        # Range-checked once: by the store on the cached path (it checks every read), here else.
        flat, target = self._flat(rows, check=False), self._target(rows)
        cached = self._gather_cached(flat, target)
        future: Future[tuple[Tensor, Any]] | _Ready
        if cached is not None:  # a gather of cached rows costs less than a thread handoff
            future = _Ready((cached, None))
        else:
            self._check_range(flat)
            stream = self._copy_stream(target) if target.type == "cuda" else None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engramlm-table")
            future = self._pool.submit(self._fetch, flat, target, stream)
        with self._lock:
            self._prefetched.append(_Prefetch(flat, target, future))
            del self._prefetched[: -self.max_prefetches]

    def warm(self, rows: Tensor) -> None:
        """A hint, earlier than :meth:`prefetch`, that [*] ``rows`` will be looked up: file-backed
        stores start reading their pages (:meth:`DiskStore.warm`) - the weights, and when
        training the Adam moments the optimiser step will read. Memory stores need nothing."""
        flat = self._flat(rows)
        stores = self.stores if self.training else (self.weight_store,)
        files = [s for s in stores if isinstance(s, FileRowStore)]
        if files:
            unique = torch.unique(flat)  # once for all three stores
            for store in files:
                store.warm(unique)

    def lookup(self, rows: Tensor) -> Tensor:  # [*] -> [*, dim]
        # Range-checked only when not prefetched: a prefetched entry's rows were checked and
        # are compared by value.
        flat, target = self._flat(rows, check=False), self._target(rows)
        hit = self._take_prefetched(flat, target)
        if hit is None:
            self._check_range(flat)
            self.prefetch_misses += 1
            values = self._gather(flat, pin=target.type == "cuda").to(target, non_blocking=True)
        else:
            self.prefetch_hits += 1
            values, event = hit.future.result()
            if event is not None:  # the copy ran on our stream: order it before the consumers
                current = torch.cuda.current_stream(target)
                current.wait_event(event)
                values.record_stream(current)
        if self.read_only or not torch.is_grad_enabled():  # no backward: no tape entry
            return values.view(*rows.shape, self.dim)
        out = _Lookup.apply(self._anchor, values, flat, self)
        return out.view(*rows.shape, self.dim)

    def _flat(self, rows: Tensor, check: bool = True) -> Tensor:
        flat = rows.detach().reshape(-1).to("cpu", torch.int64)  # [n]
        if check:
            self._check_range(flat)
        return flat

    def _check_range(self, flat: Tensor) -> None:
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_rows):
            raise IndexError(
                f"table row out of range [0, {self.num_rows}): got "
                f"[{int(flat.min())}, {int(flat.max())}]"
            )

    def _gather_cached(self, flat: Tensor, target: torch.device) -> Tensor | None:
        """[n] rows gathered at once when the table is served on the CPU and a file store's row
        cache holds every one of them; else None (nothing read or counted). :meth:`prefetch`
        then skips its thread: handing a few cached rows to it and back cost more than the
        gather (the two threads contend for the GIL): greedy decoding at B=1 with the table on
        disk (cached) ran at 0.74-0.80x the in-memory model's tokens/s through the thread,
        0.84-0.85x so (``benchmarks/decode.py``, 1 thread, 2026-12-01)."""
        read_cached = getattr(self.weight_store, "read_cached", None)
        if self.training or target.type != "cpu" or read_cached is None:
            return None
        if len(flat) <= _FEW_ROWS and len(set(ids := flat.tolist())) == len(ids):
            return read_cached(flat)  # a decode step's few rows, distinct: no sort needed
        unique, inverse = torch.unique(flat, return_inverse=True)  # each row read once
        values = read_cached(unique)
        return None if values is None else torch.index_select(values, 0, inverse)

    def _target(self, rows: Tensor) -> torch.device:
        return self.device if self.device is not None else rows.device

    def _gather(self, flat: Tensor, *, pin: bool) -> Tensor:  # [n] -> [n, dim] CPU
        store = self.weight_store
        if not isinstance(store, FileRowStore) or not getattr(store, "wants_distinct_reads", True):
            # In memory (or straight from a file's pages) a repeated row costs one more copy,
            # less than finding the repeats: the sort behind unique made the host tier 0.22x of
            # F.embedding on real ids (4.3 M vs 19 M lookups/s, benchmarks/tiers.py cache at
            # 2e5 rows).
            if not pin:
                return self.weight_store.read(flat)
            out = torch.empty(len(flat), self.dim, device="cpu", pin_memory=True)
            out.copy_(self.weight_store.read(flat))
            return out
        unique, inverse = torch.unique(flat, return_inverse=True)  # each row read once
        values = self.weight_store.read(unique)  # [u, dim]
        if not pin:
            return torch.index_select(values, 0, inverse)  # ~17x faster than values[inverse]
        out = torch.empty(len(flat), self.dim, device="cpu", pin_memory=True)  # [n, dim]
        return torch.index_select(values, 0, inverse, out=out)

    def _copy_stream(self, device: torch.device) -> Any:
        if device not in self._copy_streams:
            self._copy_streams[device] = torch.cuda.Stream(device=device)
        return self._copy_streams[device]

    def _fetch(self, flat: Tensor, target: torch.device, stream: Any) -> tuple[Tensor, Any]:
        """Runs on the prefetch thread: gather, and on CUDA start the copy on ``stream``."""
        if stream is None:
            return self._gather(flat, pin=False).to(target), None
        values = self._gather(flat, pin=True)
        with torch.cuda.device(target), torch.cuda.stream(stream):
            on_device = values.to(target, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return on_device, event

    def _take_prefetched(self, flat: Tensor, target: torch.device) -> _Prefetch | None:
        with self._lock:
            for i, entry in enumerate(self._prefetched):
                if entry.device == target and torch.equal(entry.rows, flat):
                    del self._prefetched[: i + 1]  # this one and the older ones it overtook
                    return entry
        return None

    def _invalidate(self) -> None:
        """Before any write: wait for in-flight gathers (they read the stores) and drop them."""
        with self._lock:
            entries, self._prefetched = self._prefetched, []
        wait([e.future for e in entries if isinstance(e.future, Future)])

    # --- writes, optimiser support and checkpoints -------------------------------------------
    @torch.no_grad()
    def write_rows(self, rows: Tensor, values: Tensor) -> None:
        """Overwrite weight rows [n] with [n, dim] ``values`` (conversion, loading)."""
        _check_writable(self.weight_store)
        self._invalidate()
        self.weight_store.write(rows.to("cpu", torch.int64), values.to("cpu", torch.float32))

    @torch.no_grad()
    def write_range(self, start: int, values: Tensor) -> None:
        """Overwrite weight rows [start, start + n) with [n, dim] ``values``: the bulk path
        (sequential writes, no cache or journal on disk) for loading and importing tables.
        An fp8 table takes packed uint8 rows [n, dim + dim/32] (``tables.fp8.pack_rows``)."""
        self._invalidate()
        if getattr(self.weight_store, "dtype", torch.float32) == fp8.FP8:
            self.weight_store.write_range(start, values.to("cpu"))
        else:
            self.weight_store.write_range(start, values.to("cpu", torch.float32))

    def coalesced_grad(self) -> tuple[Tensor, Tensor] | None:
        """Sum the pending row gradients per row exactly as SparseAdam's ``grad.coalesce()``."""
        if not self.pending:
            return None
        rows = torch.cat([r for r, _ in self.pending])
        grads = torch.cat(
            [g.reshape(-1, self.dim).to("cpu", torch.float32) for _, g in self.pending]
        )
        self.pending.clear()
        shape = (self.num_rows, self.dim)  # rows were range-checked at lookup
        grad = torch.sparse_coo_tensor(rows[None], grads, shape, check_invariants=False)
        grad = grad.coalesce()
        return grad._indices()[0], grad._values()

    def flush(self) -> None:
        for store in self.stores:
            store.flush()

    def close(self) -> None:
        """Flush and release the stores: disk files record their data checksum and unlock.

        Idempotent. Training calls it at the end of a run; afterwards the table is unusable
        (a disk store refuses reads) until rebuilt.
        """
        if self._closed:
            return
        self._invalidate()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for store in self.stores:
            if isinstance(store, FileRowStore):
                store.close()
            else:
                store.flush()
        self._closed = True

    @property
    def has_files(self) -> bool:
        """Whether the rows and moments live in files, which checkpoints then copy
        (:meth:`save_files`) instead of putting them in the state dicts."""
        return all(isinstance(store, FileRowStore) for store in self.stores)

    def save_files(self, directory: Path) -> dict[str, int]:
        """Snapshot the weights and both moments into the new folder ``directory``.

        -> {file name: data checksum}, for the checkpoint's manifest. O(table bytes).
        """
        self._invalidate()
        directory.mkdir(parents=True)
        return {
            store.path.name: store.snapshot(directory / store.path.name)
            for store in self._file_stores()
        }

    def load_files(self, directory: Path) -> None:
        """Roll the weights and moments back to a :meth:`save_files` snapshot in ``directory``."""
        self._invalidate()
        self.pending.clear()
        for store in self._file_stores():
            store.restore(directory / store.path.name)

    def _file_stores(self) -> list[FileRowStore]:
        stores = [s for s in self.stores if isinstance(s, FileRowStore)]
        if len(stores) != len(self.stores):
            raise TypeError(f"{self.extra_repr()}: only file-backed stores have files to copy")
        return stores

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        weight = resident(self.weight_store)
        if weight is None:
            self.flush()  # the tier's own files hold the rows
        else:
            destination[prefix + "weight"] = weight

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if strict:  # the table has no submodules: any other key under its prefix is foreign
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key)
        if key not in state_dict:
            if resident(self.weight_store) is not None:
                missing_keys.append(key)
            return
        value = state_dict[key]
        if tuple(value.shape) != (self.num_rows, self.dim):
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {list(value.shape)}, the "
                f"table is [{self.num_rows}, {self.dim}]"
            )
            return
        for start, stop in row_chunks(self.num_rows):
            self.write_range(start, value[start:stop])

    def extra_repr(self) -> str:
        return (
            f"num_rows={self.num_rows}, dim={self.dim}, "
            f"store={type(self.weight_store).__name__}, device={self.device}"
        )


class TableAdam:
    """Lazy Adam over :class:`OffloadedTable` rows: ``torch.optim.SparseAdam``'s arithmetic.

    Only rows with a gradient this step, and only their moments, are read and written; the step
    count (for bias correction) advances once per step in which the table had a gradient, as
    SparseAdam's per-parameter ``step`` does. Duck-types the parts of ``torch.optim.Optimizer``
    the training loop uses: ``param_groups`` (LR schedules set ``"lr"``), ``step``,
    ``zero_grad``, ``state_dict``/``load_state_dict``.
    """

    def __init__(
        self,
        tables: Iterable[OffloadedTable],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.tables = list(tables)
        if not self.tables:
            raise ValueError("TableAdam needs at least one OffloadedTable")
        for table in self.tables:
            table._check_trainable()
        # The tables stand where torch.optim keeps Parameters: state dicts number them in order.
        self.param_groups: list[dict[str, Any]] = [
            {"lr": lr, "betas": betas, "eps": eps, "params": list(self.tables)}
        ]

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for table in self.tables:
            coalesced = table.coalesced_grad()
            if coalesced is None:
                continue
            rows, grad = coalesced
            if grad.numel() == 0:
                continue
            table._invalidate()
            table.step_count += 1
            old_avg = table.exp_avg.read(rows)
            old_sq = table.exp_avg_sq.read(rows)
            avg_update = grad.sub(old_avg).mul_(1 - beta1)
            sq_update = grad.pow(2).sub_(old_sq).mul_(1 - beta2)
            table.exp_avg.write(rows, old_avg + avg_update)
            table.exp_avg_sq.write(rows, old_sq + sq_update)
            numer = avg_update.add_(old_avg)
            denom = sq_update.add_(old_sq).sqrt_().add_(eps)
            bias1 = 1 - beta1**table.step_count
            bias2 = 1 - beta2**table.step_count
            step_size = lr * math.sqrt(bias2) / bias1
            weights = table.weight_store.read(rows)
            table.weight_store.write(rows, weights + (-step_size * numer.div_(denom)))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for table in self.tables:
            table.pending.clear()

    def state_dict(self) -> dict[str, Any]:
        """SparseAdam's layout: per table ``step`` and, for in-memory stores, the moments.

        Moments of other tiers stay in their stores (flushed here), not in the state dict. The
        layouts match, so a checkpoint moves between a device table's SparseAdam and this.
        """
        state: dict[int, dict[str, Any]] = {}
        for i, table in enumerate(self.tables):
            entry: dict[str, Any] = {"step": table.step_count}
            avg, sq = resident(table.exp_avg), resident(table.exp_avg_sq)
            if avg is None or sq is None:
                table.flush()
            else:
                entry.update(exp_avg=avg, exp_avg_sq=sq)
            state[i] = entry
        groups = [{**g, "params": list(range(len(g["params"])))} for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this class's or ``SparseAdam``'s state dict (any tier: moments missing from it
        stay as the table's own stores hold them, e.g. restored from a disk snapshot)."""
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.tables):
            raise ValueError(
                f"state dict is for {[len(g['params']) for g in groups]} tables in "
                f"{len(groups)} groups, this TableAdam has 1 group of {len(self.tables)}"
            )
        for i, table in enumerate(self.tables):
            table._invalidate()
            if i not in state:  # SparseAdam has no state for a table it never stepped
                table.exp_avg.zero_()
                table.exp_avg_sq.zero_()
                table.step_count = 0
                continue
            entry = state[i]
            for name, store in (("exp_avg", table.exp_avg), ("exp_avg_sq", table.exp_avg_sq)):
                if name not in entry:
                    if resident(store) is not None:
                        raise ValueError(f"state of table {i} has no {name!r}")
                    continue
                value = entry[name]
                if tuple(value.shape) != (table.num_rows, table.dim):
                    raise ValueError(
                        f"{name} of table {i} is {list(value.shape)}, the table is "
                        f"[{table.num_rows}, {table.dim}]"
                    )
                for start, stop in row_chunks(table.num_rows):
                    store.write_range(start, value[start:stop].to("cpu", torch.float32))
            table.step_count = int(entry["step"])
        self.param_groups = [{**groups[0], "params": list(self.tables)}]
