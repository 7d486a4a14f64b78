"""Tables larger than memory: rows in a file, a frequency-aware hot-row cache in RAM (SPEC §5).

N-gram traffic is Zipfian (SPEC §5, paper §6.4): a small set of rows takes most lookups, so a
RAM cache of hot rows in front of an NVMe file serves most reads from memory. A
:class:`DiskStore` is a :class:`~engramlm.tables.offload.RowStore`; three of them (weights and
the two Adam moments) make an :class:`~engramlm.tables.offload.OffloadedTable`
(:func:`disk_table`).

File format (one table, one file; all integers little-endian)::

    offset  size  field
    0       8     magic b"ENGRAMTB"
    8       4     format version (1)
    12      4     dtype code: 1 float32, 2 bfloat16, 3 float16 (reads/writes are float32),
                  4 float8_e4m3fn with E8M0 scales (``tables.fp8`` packed rows: dim value
                  bytes then dim/32 scale bytes per row; read-only, dequantised on read)
    16      8     num_rows
    24      8     dim
    32      8     data offset (4096: page aligned, so the data can be memory-mapped)
    40      4     data checksum: CRC32 of the CRC32s of the data's 64 MiB chunks
    44      4     data checksum state: 0 none (written since), 1 valid
    48      4     CRC32 of bytes 0..48 (the header checksum)
    ...           zero padding to the data offset
    4096          num_rows rows, row-major, in the storage dtype (dim values; packed for 4)

Data checksum trade-off: one checksum over all the data, computed (64 MiB at a time; holes of
the sparse file are not read) only at :meth:`DiskStore.close` when something was written or no
checksum is recorded yet (a new file; a file reopened after a crash, its journal replayed), and
checked only by :meth:`DiskStore.verify` / ``open(verify=True)``: seconds per GB written.
Keeping a checksum current on every write-back would mean re-reading whole blocks around each
randomly scattered row (a Zipfian batch touches ~one row per block), multiplying disk traffic;
instead the first write after opening marks the checksum stale (durably, before any data moves),
so a file that was not closed cleanly says "no checksum" rather than a wrong one. Crash safety
comes from the journal, not the checksum.

Crash consistency: dirty rows reach the file in write-back batches. Each batch is appended to
a write-ahead journal ``<path>.journal`` (one record: row ids + values, with its length and a
CRC32) and fsync'd, and only then written in place. The in-place writes are not synced per batch:
the journal already makes them durable, and one ``msync`` of scattered rows per batch cost ~0.1 s
(measured, 7k rows). At a checkpoint - :meth:`DiskStore.flush`, or when the journal passes
256 MiB - the data is synced and the journal truncated. Opening a file replays the complete
records in order (idempotent: they hold final values) and discards an incomplete or corrupt
trailing one, so after a crash every row of a batch is either all-old (its record never became
durable) or all-new.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engramlm.tables import fp8
from engramlm.tables.offload import OffloadedTable

log = logging.getLogger(__name__)

MAGIC = b"ENGRAMTB"
FORMAT_VERSION = 1
DATA_OFFSET = 4096
_HEADER = struct.Struct("<8sIIQQQII")  # magic, version, dtype, rows, dim, offset, crc, state
_HEADER_CRC = struct.Struct("<I")
# dtype code -> (torch dtype, numpy storage dtype). bfloat16 has no numpy dtype: its bits are
# stored as uint16 and reinterpreted by torch.
_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    1: (torch.float32, np.dtype("<f4")),
    2: (torch.bfloat16, np.dtype("<u2")),
    3: (torch.float16, np.dtype("<f2")),
    4: (fp8.FP8, np.dtype("u1")),  # packed rows (tables.fp8): values, then E8M0 scales
}
_CODES = {torch_dtype: code for code, (torch_dtype, _) in _DTYPES.items()}
_FP8_CODE = 4
_CRC_NONE, _CRC_VALID = 0, 1
_CRC_CHUNK = 64 << 20

_RECORD = struct.Struct("<8sQQII")  # magic, n rows, payload bytes, payload crc, record-header crc
_RECORD_MAGIC = b"ENGJRNL1"

# Cache bookkeeping per cached row besides its float32 values: slot row id, sorted index key and
# slot (8 + 8 + 8), last-use tick (8), dirty flag and frequency (1 + 1), sketch share (<= 32).
_ROW_OVERHEAD_BYTES = 72
_KEY_BYTES = 16  # of which the sorted index of cached ids (none with a direct map)
# Above this many cached rows, victims are chosen from a random sample (as Redis' approximate
# LFU does) instead of a full partition, so eviction cost does not grow with the cache.
_VICTIM_SAMPLE = 1 << 16

# In-place writes go in chunks so that a test can kill a write-back half-way (``_fault_hook``).
_IN_PLACE_CHUNK_BYTES = 64 << 20
_READERS = 64  # concurrent row readers for cache misses (see DiskStore._read_file_rows)
_READER_MIN_ROWS = 256  # fewer misses than this per reader are read inline
# Missed rows read inline while their pages are resident (DiskStore._read_file_rows): a chunk
# of rows that copies slower than this per row had to wait for the device.
_PROBE_ROWS, _MAX_INLINE_CHUNK, _RESIDENT_ROW_SECONDS = 64, 4096, 2e-6
_PAGE = mmap.PAGESIZE  # what one missed row costs to read (the maps are MADV_RANDOM)
_PENDING_ROWS = 8192  # full-hit reads queued before they are counted (DiskStore._read_hits)
_JOURNAL_CHECKPOINT_BYTES = 256 << 20
# From this many rows on, rows are moved by torch (``index_select`` / ``index_copy_``), below by
# numpy's fancy indexing, whose per-call cost is lower but which copies 1 KB rows 3-4x slower
# (warm page cache, 20,841 rows a batch: 126 ms a pass against 359 ms; docs/benchmarks.md).
_TORCH_ROWS = 64


def _take(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``rows[index]`` for a 2-D array (a memory map too): a new [len(index), width] array."""
    if len(index) < _TORCH_ROWS:
        return rows[index]
    return torch.index_select(torch.from_numpy(rows), 0, torch.from_numpy(index)).numpy()


def _put(rows: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """``rows[index] = values`` for a 2-D array and [n] distinct int64 ``index``."""
    if len(index) < _TORCH_ROWS:
        rows[index] = values
        return
    torch.from_numpy(rows).index_copy_(
        0, torch.from_numpy(index), torch.from_numpy(np.ascontiguousarray(values))
    )


def _fault_hook(stage: str) -> None:
    """Called after the journal is durable ("journaled") and after each in-place chunk
    ("in_place"); does nothing. Crash tests replace it with one that kills the process."""


@functools.cache
def _reader_pool() -> ThreadPoolExecutor:
    """One process-wide pool for miss reads: threads mostly wait on page faults, not the CPU."""
    return ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="engramlm-disk-read")


class TableFileError(ValueError):
    """A table file (or its journal) that cannot be trusted; the message names file and problem."""


def _row_width(code: int, dim: int) -> int:
    """Stored elements per row: ``dim``, or the packed width (values + scales) for fp8."""
    return fp8.packed_width(dim) if code == _FP8_CODE else dim


def _row_bytes(code: int, dim: int) -> int:
    return _row_width(code, dim) * _DTYPES[code][1].itemsize


def _header_bytes(dtype_code: int, num_rows: int, dim: int, data_crc: int, crc_state: int) -> bytes:
    fields = _HEADER.pack(
        MAGIC, FORMAT_VERSION, dtype_code, num_rows, dim, DATA_OFFSET, data_crc, crc_state
    )
    return fields + _HEADER_CRC.pack(zlib.crc32(fields))


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


@functools.cache
def _zeros_crc(size: int) -> int:
    return zlib.crc32(bytes(size))


def _is_hole(fd: int, offset: int, size: int) -> bool:
    """Whether [offset, offset + size) of the file holds no data (reads as zeros)."""
    if not hasattr(os, "SEEK_DATA"):
        return False
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + size
    except OSError:  # ENXIO: no data at or after offset
        return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_header(path: Path, raw: bytes) -> tuple[int, int, int, int, int]:
    """Validate a header read from ``path`` -> (dtype code, num_rows, dim, data crc, crc state)."""
    if len(raw) < _HEADER.size + _HEADER_CRC.size:
        raise TableFileError(f"{path}: truncated: {len(raw)} bytes, shorter than a header")
    fields = raw[: _HEADER.size]
    magic, version, code, num_rows, dim, offset, crc, state = _HEADER.unpack(fields)
    if magic != MAGIC:
        raise TableFileError(f"{path}: not an engramlm table (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise TableFileError(
            f"{path}: format version {version}, this engramlm reads {FORMAT_VERSION}"
        )
    (stored,) = _HEADER_CRC.unpack(raw[_HEADER.size : _HEADER.size + _HEADER_CRC.size])
    if zlib.crc32(fields) != stored:
        raise TableFileError(f"{path}: header checksum mismatch (corrupt header)")
    if code not in _DTYPES or offset != DATA_OFFSET or num_rows < 1 or dim < 1:
        raise TableFileError(
            f"{path}: bad header (dtype code {code}, offset {offset}, shape [{num_rows}, {dim}])"
        )
    return code, int(num_rows), int(dim), crc, state


def _extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """[start, end) of a sparse file as (offset, length, holds data) runs, via SEEK_DATA/HOLE."""
    if not hasattr(os, "SEEK_DATA"):
        yield start, end - start, True
        return
    pos = start
    while pos < end:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
        except OSError:  # ENXIO: no data at or after pos
            data = end
        if data > pos:
            yield pos, data - pos, False
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data, True
        pos = hole


def _copy_data(src_fd: int, dst_fd: int | None, end: int, *, dst_is_new: bool = False) -> int:
    """The data checksum of ``src_fd``'s rows [DATA_OFFSET, end); copies them into ``dst_fd``.

    One pass, 64 MiB chunks: the checksum (a CRC32 of the chunks' CRC32s) and the copy come
    from the same read. Holes of the sparse source are not read (their CRC is over zeros) and,
    when ``dst_is_new`` (a fresh sparse file of size ``end``), not written: copies stay as
    sparse as the source and a mostly-unwritten table costs milliseconds. Otherwise a source
    hole is written as zeros where the destination holds data.
    """
    chunk_crcs, offset = [], DATA_OFFSET
    while offset < end:
        size = min(_CRC_CHUNK, end - offset)
        if _is_hole(src_fd, offset, size):
            chunk_crcs.append(_zeros_crc(size))
            if dst_fd is not None and not dst_is_new and not _is_hole(dst_fd, offset, size):
                _write_all(dst_fd, _zeros(size), offset)
            offset += size
            continue
        crc = 0
        for pos, length, has_data in _extents(src_fd, offset, offset + size):
            if has_data:
                data = os.pread(src_fd, length, pos)
                if len(data) != length:
                    raise OSError(f"short read: {len(data)} of {length} bytes at offset {pos}")
            else:
                data = _zeros(length)
            crc = zlib.crc32(data, crc)
            if dst_fd is not None and (has_data or not dst_is_new):
                _write_all(dst_fd, data, pos)
        chunk_crcs.append(crc)
        offset += size
    return zlib.crc32(np.array(chunk_crcs, dtype="<u4").tobytes())


@functools.cache
def _zero_chunk() -> bytes:
    return bytes(_CRC_CHUNK)


def _zeros(size: int) -> memoryview:
    return memoryview(_zero_chunk())[:size]


def _read_snapshot_header(path: Path) -> tuple[int, int, int, int]:
    """(dtype code, num_rows, dim, data crc) of a closed table file (a snapshot, an export);
    refuses one without a valid crc."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_HEADER.size + _HEADER_CRC.size)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise TableFileError(f"{path}: unreadable table file ({e})") from e
    code, num_rows, dim, crc, state = _parse_header(path, raw)
    expected = DATA_OFFSET + num_rows * _row_bytes(code, dim)
    if size != expected:
        raise TableFileError(
            f"{path}: file is {size} bytes but its header implies {expected}; truncated"
        )
    if state != _CRC_VALID:
        raise TableFileError(
            f"{path}: records no data checksum: it was not closed cleanly (still open, or its "
            "writer stopped), so its rows are not known to be complete"
        )
    return code, num_rows, dim, crc


def verify_snapshot(path: str | os.PathLike[str], expected_crc: int) -> None:
    """Check a table snapshot (written by :meth:`DiskStore.snapshot`) against the data checksum
    a checkpoint manifest recorded for it; raise :class:`TableFileError` naming the file.

    Reads every data byte (holes skipped): seconds per GB, like a checkpoint's SHA-256.
    """
    path = Path(path)
    _, _, _, stored = _read_snapshot_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        actual = _copy_data(fd, None, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if actual != expected_crc or stored != expected_crc:
        raise TableFileError(
            f"{path}: data checksum mismatch (corrupt table file): recorded "
            f"{expected_crc:#010x}, header {stored:#010x}, computed {actual:#010x}"
        )


def snapshot_weights(directory: str | os.PathLike[str]) -> Tensor:
    """The [num_rows, dim] float32 weights of a :func:`disk_table` snapshot in ``directory``.

    What serving a disk-trained checkpoint from another tier reads: a float32 file is mapped
    (copy-on-write, so nothing is read until the rows are copied into the target table).
    """
    return _snapshot_rows(Path(directory) / f"{_STORE_FILES[0]}.engt")


def snapshot_moments(directory: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The Adam moments ``{"exp_avg": [num_rows, dim], "exp_avg_sq": ...}`` float32 of a
    :func:`disk_table` snapshot, mapped like :func:`snapshot_weights`: what resuming a
    disk-trained checkpoint on another tier hands to that tier's optimiser."""
    return {name: _snapshot_rows(Path(directory) / f"{name}.engt") for name in _STORE_FILES[1:]}


def read_table_file(path: str | os.PathLike[str]) -> Tensor:
    """The [num_rows, dim] rows of a closed table file, in its storage dtype, mapped
    (copy-on-write: nothing is read until the rows are used; writes never reach the file).

    What ``engramlm tables import`` copies from: a file of ``engramlm tables export``, a disk
    run's live tables after training, a checkpoint's snapshot. Refuses, raising
    :class:`TableFileError` naming the file, one that is truncated, has a corrupt header, was
    not closed cleanly or still has writes in its journal; :func:`verify_table_file` checks
    the data too.
    """
    path = Path(path)
    journal = path.with_name(path.name + ".journal")
    if journal.exists() and journal.stat().st_size:
        raise TableFileError(
            f"{journal}: {journal.stat().st_size} bytes of journaled writes are not in {path} "
            "yet; open it once with DiskStore.open (which replays them) and close it"
        )
    code, num_rows, dim, _ = _read_snapshot_header(path)
    return _map_rows(path, code, num_rows, dim)


def drop_page_cache(directory: str | os.PathLike[str]) -> None:
    """Evict the clean pages of every table file under ``directory`` from the page cache (no
    root needed): reads then come from the disk, as for tables larger than RAM - what the
    benchmarks and recipes use for a cold start instead of tables just written."""
    for path in Path(directory).rglob("*.engt"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def verify_table_file(path: str | os.PathLike[str]) -> None:
    """Check a closed table file's data against the checksum in its header; raise
    :class:`TableFileError` naming the file. Reads every byte: seconds per GB."""
    verify_snapshot(path, _read_snapshot_header(Path(path))[3])


def _snapshot_rows(path: Path) -> Tensor:  # -> [num_rows, dim] float32
    return _map_rows(path, *_read_snapshot_header(path)[:3]).float()


def _map_rows(path: Path, code: int, num_rows: int, dim: int) -> Tensor:
    torch_dtype, np_dtype = _DTYPES[code]
    shape = (num_rows, _row_width(code, dim))
    rows = np.memmap(path, dtype=np_dtype, mode="c", offset=DATA_OFFSET, shape=shape)
    if torch_dtype == torch.bfloat16:  # no numpy bfloat16: reinterpret the stored bits
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(rows)


class FrequencySketch:
    """TinyLFU's popularity estimate: a count-min sketch with periodic halving.

    Four rows of 4 * capacity (rounded up to a power of two) counters - wide enough that a cold
    row rarely collides with hot ones in all four - capped at 15 (Caffeine's 4-bit counters),
    incremented with the
    conservative update (only the minimal counters grow, which tightens the over-estimate).
    After ``10 * capacity`` increments every counter is halved, so popularity decays and rows
    that were hot long ago lose to rows that are hot now. Vectorised over batches of ids.
    """

    DEPTH = 4
    CAP = 15

    def __init__(self, capacity: int) -> None:
        bits = max(6, int(4 * max(capacity, 1) - 1).bit_length())
        self.width = 1 << bits
        self.shift = np.uint64(64 - bits)
        self.counts = np.zeros((self.DEPTH, self.width), dtype=np.uint8)
        # One odd 64-bit multiplier per depth (multiply-shift hashing: the top ``bits`` bits of
        # row * a mod 2^64). Three numpy passes per batch instead of the eleven of a splitmix64
        # finaliser: at decoding's batches of ~16 rows the sketch's cost is numpy's per-call
        # overhead, and it is paid on every cache hit.
        self.seeds = np.array(
            [0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93],
            dtype=np.uint64,
        )[:, None]
        self.starts = np.arange(self.DEPTH, dtype=np.intp)[:, None] * self.width
        self.sample_size = 10 * max(capacity, 1)
        self.additions = 0

    def _index(self, rows: np.ndarray) -> np.ndarray:  # [n] int64 -> [DEPTH, n] flat indices
        x = rows.astype(np.uint64)[None, :] * self.seeds  # wraps mod 2^64, as intended
        return (x >> self.shift).astype(np.intp) + self.starts

    def increment(
        self, rows: np.ndarray, uses: np.ndarray | None = None
    ) -> tuple[np.ndarray, bool]:
        """Count one use of each id (``uses[i]`` uses of ``rows[i]``: distinct ids then); ->
        ([n] uint8 estimates after counting, whether it aged)."""
        index = self._index(rows)
        counts = self.counts.reshape(-1)  # a view: the writes below land in self.counts
        current = counts[index]  # [DEPTH, n]
        added = 1 if uses is None else uses
        estimate = np.minimum(current.min(axis=0) + added, self.CAP).astype(np.uint8)
        counts[index] = np.maximum(current, estimate)  # only the minimal counters grow
        self.additions += len(rows) if uses is None else int(uses.sum())
        if self.additions < self.sample_size:
            return estimate, False
        self.counts >>= 1
        self.additions //= 2
        return estimate >> 1, True


class DiskStore:
    """A file-backed :class:`~engramlm.tables.offload.RowStore` with a hot-row RAM cache.

    Cache policy (for Zipfian n-gram traffic): *admission* by TinyLFU - a missed row enters a
    full cache only if the :class:`FrequencySketch` says it is used more often than the row it
    would evict, so one-off rows of the long tail do not flush the hot head out (plain LRU's
    failure on Zipfian scans). *Eviction* picks the least-frequently used row, ties broken by
    least-recent use; frequencies age through the sketch's halving, which gives LFU its missing
    recency. Batches are handled with numpy: a sorted array of cached ids answers lookups with
    ``searchsorted``, misses are read with fancy indexing on the memory map, and victims are
    chosen with ``argpartition`` (over a random sample once the cache is large). Reads that
    hit in full (decoding's common case) are counted later in one batch (:meth:`_read_hits`),
    so recency is kept per batch of such reads: our simplification of TinyLFU's per-access
    recency, for a 1.8x cheaper hit path.

    With ``cache_bytes=0`` there is no row cache and no bookkeeping: reads copy rows straight
    from the file's pages, and the kernel's page cache is the only cache. That is the fastest
    tier when the file fits in the page cache (a warm pass over real ids: 2-6x the row-cached
    store's lookups/s, docs/benchmarks.md); the row cache wins when it does not, as it keeps
    rows, not the 4 KB pages around them, and admits by frequency.

    The cache is write-back: writes land in the cache (dirty) and reach the file, through the
    journal, when their row is evicted, when the write is not admitted, or at :meth:`flush`.
    Reads always return what was last written (rounded to the storage dtype: with a bfloat16
    file, ``write`` rounds at once so cached and on-disk copies agree). Thread-safe: the
    offloaded table prefetches on a worker thread while the optimiser writes.
    """

    def __init__(self, path: str | os.PathLike[str], *, cache_bytes: int = 256 << 20) -> None:
        """Open an existing table file (replaying its journal); see :meth:`open`, :meth:`create`."""
        path = Path(path)
        self.path = path
        self.journal_path = path.with_name(path.name + ".journal")
        self._fd = os.open(path, os.O_RDWR)
        try:
            try:  # one writer per file: a second would replay and truncate the first's journal
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TableFileError(f"{path}: already open in another DiskStore") from None
            self._read_header()
            self._check_size()
        except BaseException:
            os.close(self._fd)
            raise
        self._mm = np.memmap(
            path, dtype=self._np_dtype, mode="r+", offset=DATA_OFFSET, shape=self._shape
        )
        # Row reads are random: without this the kernel's read-ahead (often MBs) turns every
        # missed 128-byte row into megabytes of I/O (measured: 95.8 GB read for 9 steps).
        self._mm._mmap.madvise(mmap.MADV_RANDOM)
        self._lock = threading.Lock()
        # Held while read-ahead hints use the fd (``warm``), so ``close`` cannot close it under
        # them; separate from ``_lock`` so hints never hold up reads and writes.
        self._warm_lock = threading.Lock()
        self._written = False  # since open: the data checksum is stale once this is set
        self._closed = False
        self._journal_bytes = 0
        existed = self.journal_path.exists()
        self._jfd = os.open(self.journal_path, os.O_RDWR | os.O_CREAT, 0o644)
        if not existed:
            _fsync_dir(self.journal_path)
        self._replay_journal()

        # fp8 tables cache their packed rows as stored (264 bytes at dim 256, not 1 KB of
        # float32: ~3.9x the rows per byte) and dequantise hits; others cache float32 rows.
        self._cache_packed = self.dtype == fp8.FP8
        self._slot_bytes = self._row_bytes if self._cache_packed else 4 * self.dim
        self.capacity = max(0, cache_bytes) // (self._slot_bytes + _ROW_OVERHEAD_BYTES)
        # Which slot holds a row: a sorted array of the cached ids (16 of a cached row's
        # overhead bytes), searched per batch, or - when it is the smaller of the two, i.e. the
        # cache holds over a quarter of the table's rows - a direct map, row id -> slot (4 bytes
        # per table row, taken from the budget): one lookup per row instead of a binary search
        # over the cache (a warm replay with every row cached: 3.9 -> 9.5 M lookups/s at a 3.2M
        # row cache; docs/benchmarks.md, goal 3).
        self._slot_of: np.ndarray | None = None
        if 0 < 4 * self.num_rows <= _KEY_BYTES * self.capacity:
            self.capacity = (cache_bytes - 4 * self.num_rows) // (
                self._slot_bytes + _ROW_OVERHEAD_BYTES - _KEY_BYTES
            )
            self._slot_of = np.full(self.num_rows, -1, dtype=np.int32)
        self._slot_row = np.full(self.capacity, -1, dtype=np.int64)
        self._slot_data = (
            np.zeros((self.capacity, self._width), dtype=np.uint8)
            if self._cache_packed
            else np.zeros((self.capacity, self.dim), dtype=np.float32)
        )
        self._slot_dirty = np.zeros(self.capacity, dtype=bool)
        self._slot_freq = np.zeros(self.capacity, dtype=np.uint8)
        self._slot_tick = np.zeros(self.capacity, dtype=np.int64)
        self._used = 0  # slots [0, used) hold rows; a slot is only freed to be refilled at once
        self._keys = np.empty(0, dtype=np.int64)  # cached row ids, sorted (without _slot_of)
        self._key_slots = np.empty(0, dtype=np.int64)  # their slots
        self._sketch = FrequencySketch(self.capacity)
        self._rng = np.random.default_rng(0)
        self._tick = 0
        # Reads that hit in full are counted later, in one batch (``_settle``): see ``_read``.
        self._pending_rows: list[np.ndarray] = []
        self._pending_slots: list[np.ndarray] = []
        self._pending = 0
        self._stats = {"hits": 0, "misses": 0, "evictions": 0, "writebacks": 0, "pages_warmed": 0}

    # --- files -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        num_rows: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        cache_bytes: int = 256 << 20,
    ) -> DiskStore:
        """Create a zero-filled table file and open it; refuses to overwrite an existing file.

        The data region is made by ``truncate``, so the file is sparse: creating a 20 GB table
        allocates nothing and takes milliseconds; blocks appear as rows are written.
        """
        if num_rows < 1 or dim < 1:
            raise ValueError(f"table shape must be positive, got num_rows={num_rows}, dim={dim}")
        if dtype not in _CODES:
            raise ValueError(f"dtype must be one of {sorted(map(str, _CODES))}, got {dtype}")
        path = Path(path)
        code = _CODES[dtype]
        size = DATA_OFFSET + num_rows * _row_bytes(code, dim)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, _header_bytes(code, num_rows, dim, 0, _CRC_NONE), 0)
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path)
        log.info("created %s: [%d, %d] %s, %.2f GB sparse", path, num_rows, dim, dtype, size / 1e9)
        return cls(path, cache_bytes=cache_bytes)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, cache_bytes: int = 256 << 20, verify: bool = False
    ) -> DiskStore:
        """Open a table file, replaying its journal; ``verify`` also checks the data checksum."""
        store = cls(path, cache_bytes=cache_bytes)
        if verify:
            try:
                store.verify()
            except BaseException:
                store.close()
                raise
        return store

    def _read_header(self) -> None:
        raw = os.pread(self._fd, _HEADER.size + _HEADER_CRC.size, 0)
        code, num_rows, dim, crc, state = _parse_header(self.path, raw)
        self.num_rows, self.dim = num_rows, dim
        self._code = code
        self.dtype, self._np_dtype = _DTYPES[code]
        self._width = _row_width(code, dim)  # stored elements per row
        self._row_bytes = _row_bytes(code, dim)
        self._shape = (self.num_rows, self._width)
        self._data_crc, self._crc_state = crc, state

    def _check_size(self) -> None:
        expected = DATA_OFFSET + self.num_rows * self._row_bytes
        actual = os.fstat(self._fd).st_size
        if actual != expected:
            raise TableFileError(
                f"{self.path}: file is {actual} bytes but its header implies {expected} "
                f"([{self.num_rows}, {self.dim}] {self.dtype}); truncated or not a table"
            )

    def _write_header(self) -> None:
        header = _header_bytes(self._code, self.num_rows, self.dim, self._data_crc, self._crc_state)
        _write_all(self._fd, header, 0)
        os.fsync(self._fd)

    def _data_checksum(self) -> int:
        """CRC32 over the CRC32s of the data's 64 MiB chunks (a hash list).

        Chunk by chunk so memory stays bounded; a chunk that is entirely a hole of the sparse
        file (``SEEK_DATA`` skips past it) is zeros and its CRC is computed once, not read -
        closing a mostly-unwritten 20 GB table costs milliseconds, not a 20 GB read.
        """
        end = os.fstat(self._fd).st_size
        start = time.perf_counter()
        crc = _copy_data(self._fd, None, end)
        elapsed = time.perf_counter() - start
        log.debug("%s: checksum of %.2f GB in %.1fs", self.path, end / 1e9, elapsed)
        return crc

    def verify(self) -> bool:
        """Check the data against the checksum stored at the last clean close.

        -> True when it matches; False (with a warning) when the file has no valid checksum -
        written since, or never closed after creation. A mismatch raises :class:`TableFileError`.
        Reads the whole file (chunked): seconds per GB.
        """
        with self._lock:
            self._check_open()
            if self._written or self._crc_state != _CRC_VALID:
                log.warning("%s: no valid data checksum recorded; nothing verified", self.path)
                return False
            actual = self._data_checksum()
        if actual != self._data_crc:
            raise TableFileError(
                f"{self.path}: data checksum mismatch (stored {self._data_crc:#010x}, "
                f"computed {actual:#010x}); the rows are corrupt"
            )
        return True

    def _begin_writes(self) -> None:
        """Durably mark the data checksum stale before the first byte of data changes."""
        if not self._written:
            self._written = True
            self._crc_state = _CRC_NONE
            self._write_header()

    # --- journal -----------------------------------------------------------------------------
    def _replay_journal(self) -> None:
        size = os.fstat(self._jfd).st_size
        if size == 0:
            return
        raw = os.pread(self._jfd, size, 0)
        offset, replayed = 0, 0
        while offset < len(raw):
            record = self._parse_record(raw, offset)
            if record is None:
                log.warning(
                    "%s: discarding %d bytes of incomplete or corrupt journal",
                    self.journal_path,
                    len(raw) - offset,
                )
                break
            rows, values, offset = record
            self._begin_writes()
            self._mm[rows] = values
            replayed += len(rows)
        if replayed:
            log.info("%s: replayed %d rows from the journal", self.path, replayed)
        self._checkpoint()

    def _checkpoint(self) -> None:
        """Sync the data, then empty the journal: the file alone now holds every write-back."""
        self._mm.flush()
        os.ftruncate(self._jfd, 0)
        os.fsync(self._jfd)
        self._journal_bytes = 0

    def _parse_record(self, raw: bytes, offset: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        if len(raw) - offset < _RECORD.size:
            return None
        head = raw[offset : offset + _RECORD.size]
        magic, n, length, payload_crc, head_crc = _RECORD.unpack(head)
        if magic != _RECORD_MAGIC or zlib.crc32(head[:-4]) != head_crc:
            return None
        start = offset + _RECORD.size
        if length != n * (8 + self._row_bytes) or len(raw) - start < length:
            return None
        payload = raw[start : start + length]
        if zlib.crc32(payload) != payload_crc:
            return None
        rows = np.frombuffer(payload, dtype="<i8", count=n)
        if n and (rows.min() < 0 or rows.max() >= self.num_rows):
            return None
        values = np.frombuffer(payload, dtype=self._np_dtype, offset=8 * n).reshape(n, self._width)
        return rows, values, start + length

    def _write_back(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Journal, then write in place: [n] distinct ids, [n, dim] float32 (already rounded)."""
        if len(rows) == 0:
            return
        order = np.argsort(rows, kind="stable")
        rows = np.ascontiguousarray(rows[order], dtype="<i8")
        stored = self._to_storage(values[order])
        payload = rows.tobytes() + stored.tobytes()
        head = struct.pack("<8sQQI", _RECORD_MAGIC, len(rows), len(payload), zlib.crc32(payload))
        self._begin_writes()
        record = head + struct.pack("<I", zlib.crc32(head)) + payload
        _write_all(self._jfd, record, self._journal_bytes)
        os.fsync(self._jfd)
        self._journal_bytes += len(record)
        _fault_hook("journaled")
        chunk = max(1, _IN_PLACE_CHUNK_BYTES // self._row_bytes)
        for start in range(0, len(rows), chunk):
            self._mm[rows[start : start + chunk]] = stored[start : start + chunk]
            _fault_hook("in_place")
        self._stats["writebacks"] += len(rows)
        if self._journal_bytes > _JOURNAL_CHECKPOINT_BYTES:
            self._checkpoint()

    # --- dtype conversion --------------------------------------------------------------------
    def _to_storage(self, values: np.ndarray) -> np.ndarray:  # [n, dim] float32 -> storage
        if self.dtype == fp8.FP8:  # packed rows are stored as they come (see write_range)
            return np.ascontiguousarray(values, dtype=np.uint8)
        if self.dtype == torch.float32:
            return np.ascontiguousarray(values, dtype="<f4")
        converted = torch.from_numpy(np.ascontiguousarray(values)).to(self.dtype)
        if self.dtype == torch.bfloat16:
            return converted.view(torch.int16).numpy().view("<u2")
        return converted.numpy().astype("<f2")

    def _from_storage(self, stored: np.ndarray) -> np.ndarray:  # storage -> [n, dim] float32
        if self.dtype == fp8.FP8:
            packed = torch.from_numpy(np.ascontiguousarray(stored))
            return fp8.dequantize_rows(packed, self.dim).numpy()
        if self.dtype == torch.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(stored).view(np.int16))
            return bits.view(torch.bfloat16).float().numpy()
        return np.asarray(stored, dtype=np.float32)

    def _round(self, values: np.ndarray) -> np.ndarray:
        if self.dtype == torch.float32:
            return values
        return self._from_storage(self._to_storage(values))

    # --- the RowStore interface --------------------------------------------------------------
    def _check_rows(self, rows: Tensor) -> np.ndarray:
        r = rows.detach().reshape(-1).to("cpu", torch.int64).numpy()
        if r.size and (r.min() < 0 or r.max() >= self.num_rows):
            raise IndexError(
                f"{self.path}: row out of range [0, {self.num_rows}): got [{r.min()}, {r.max()}]"
            )
        return r

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: store is closed")

    def read(self, rows: Tensor) -> Tensor:  # [n] -> [n, dim]
        out = self._read(rows, only_cached=False)
        assert out is not None
        return out

    def read_cached(self, rows: Tensor) -> Tensor | None:
        """:meth:`read` when every one of the [n] ids is in the row cache (a read that touches
        no file); else None, and nothing is counted or changed."""
        return self._read(rows, only_cached=True)

    @property
    def wants_distinct_reads(self) -> bool:
        """Whether a read should name each row once (the offloaded table then finds the
        repeats): true with a row cache, whose bookkeeping is per row asked for; without one
        (``cache_bytes=0``) rows are copied straight from the file's pages, repeats and all."""
        return self.capacity > 0

    def _read(self, rows: Tensor, *, only_cached: bool) -> Tensor | None:
        r = self._check_rows(rows)
        with self._lock:
            self._check_open()
            if self.capacity == 0:  # no row cache: the kernel's page cache is the only one
                if only_cached:
                    return None
                self._stats["misses"] += len(r)
                return torch.from_numpy(self._from_storage(self._read_file_rows(r)))
            slots = self._find(r)
            if not bool((slots < 0).any()):
                return torch.from_numpy(self._read_hits(r, slots))
            if only_cached:
                return None
            freq, hit, hit_slots = self._access(r, slots)
            out = np.empty((len(r), self.dim), dtype=np.float32)
            cached = _take(self._slot_data, hit_slots)
            _put(
                out,
                np.flatnonzero(hit),
                self._from_storage(cached) if self._cache_packed else cached,
            )
            miss = np.flatnonzero(~hit)
            self._stats["hits"] += len(hit_slots)
            self._stats["misses"] += len(miss)
            if len(miss):
                missed = r[miss]
                if len(missed) > 1 and bool((missed[1:] > missed[:-1]).all()):
                    first = inverse = None  # sorted and distinct already (the offloaded table's)
                else:
                    missed, first, inverse = np.unique(
                        missed, return_index=True, return_inverse=True
                    )
                stored = self._read_file_rows(missed)
                values = self._from_storage(stored)
                _put(out, miss, values if inverse is None else _take(values, inverse))
                slot_values = stored if self._cache_packed else values
                missed_freq = freq[miss] if first is None else freq[miss][first]
                self._install(missed, slot_values, missed_freq, hit_slots, dirty=False)
        return torch.from_numpy(out)

    def _read_hits(self, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """[n] rows that are all cached (in ``slots``) -> [n, dim] float32, counted later.

        Decoding reads a few rows per step, nearly always all cached; there the per-read
        bookkeeping (sketch counts, frequency and recency of the slots: ~15 numpy calls) cost
        more than the gather. So a read that hits in full only queues its rows, and
        :meth:`_settle` counts the queue in one batch before anything that reads or changes
        the cache policy's state (a read with misses, a write, eviction) and every
        ``_PENDING_ROWS`` rows. Counts are the same (a row hit by k reads gains k, capped);
        recency is kept per settle rather than per read."""
        cached = _take(self._slot_data, slots)
        self._stats["hits"] += len(rows)
        self._pending_rows.append(rows)
        self._pending_slots.append(slots)
        self._pending += len(rows)
        if self._pending >= _PENDING_ROWS:
            self._settle()
        return self._from_storage(cached) if self._cache_packed else cached

    def _settle(self) -> None:
        """Count the queued full-hit reads: sketch, slot frequencies, one recency tick."""
        if not self._pending_rows:
            return
        rows, slots = np.concatenate(self._pending_rows), np.concatenate(self._pending_slots)
        self._pending_rows, self._pending_slots, self._pending = [], [], 0
        distinct, first, uses = np.unique(rows, return_index=True, return_counts=True)
        self._tick += 1
        freq = self._touch(distinct, uses)
        self._slot_freq[slots[first]] = freq
        self._slot_tick[slots[first]] = self._tick

    def warm(self, rows: Tensor | np.ndarray) -> None:
        """Start reading the file pages of ``rows`` (int64 ids, any order, repeats allowed) that
        are not in the row cache, so a later :meth:`read` finds them in the page cache.

        A hint: values, the row cache and the hit/miss counts are untouched (``stats()`` counts
        ``pages_warmed``). The data loader calls it a batch or two ahead of the step
        (``EngramLM.warm_tables``), so the disk reads the pages while the current step computes
        instead of at the lookup. ``posix_fadvise(POSIX_FADV_WILLNEED)`` on the file, one call
        per run of adjacent pages. Measured on the benchmark VM (1.5 GB file, page cache
        dropped, 20,000 random rows read 1 s after the hint): the read took 21 ms after
        ``fadvise`` and 25 ms after ``madvise(MADV_WILLNEED)`` on the map, against 199 ms
        unhinted. Equal help, but the hint itself blocks once the disk queue is full (140-220 ms
        for those 20,000 pages, ~80 ms of it CPU), and CPython's ``mmap.madvise`` holds the GIL
        throughout, which would stall the training thread; ``os.posix_fadvise`` releases it.
        """
        r = np.unique(self._check_rows(torch.as_tensor(rows)))
        with self._lock:  # the cache index is rebuilt by lookups and writes
            self._check_open()
            r = r[self._find(r) < 0]
        with self._warm_lock:
            self._check_open()
            pages = self._advise_willneed(r)
        with self._lock:
            self._stats["pages_warmed"] += pages

    def _advise_willneed(self, rows: np.ndarray) -> int:
        """``posix_fadvise(POSIX_FADV_WILLNEED)`` the file pages of [n] distinct ``rows``, one
        call per run of adjacent pages: the kernel queues every read at once and returns (it
        releases the GIL). -> the number of pages advised (0 where the OS has no fadvise)."""
        if not hasattr(os, "posix_fadvise") or len(rows) == 0:  # macOS has none: hint nothing
            return 0
        row_bytes = self._row_bytes
        first = (DATA_OFFSET + rows * row_bytes) // _PAGE  # a row may straddle two pages
        last = (DATA_OFFSET + (rows + 1) * row_bytes - 1) // _PAGE
        pages = np.unique(np.concatenate([first, last]))
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        starts = pages[np.concatenate([[0], breaks])]
        stops = pages[np.concatenate([breaks - 1, [len(pages) - 1]])] + 1
        for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            length = (stop - start) * _PAGE
            os.posix_fadvise(self._fd, start * _PAGE, length, os.POSIX_FADV_WILLNEED)
        return len(pages)

    def write(self, rows: Tensor, values: Tensor) -> None:
        """Store [n, dim] ``values`` at [n] distinct ids (in the cache; durable at flush)."""
        if self.dtype == fp8.FP8:
            raise TypeError(
                f"{self.path}: fp8 tables are read-only (serving; training fp8 tables is not "
                "supported): their rows are written whole, packed, with write_range"
            )
        r = self._check_rows(rows)
        v = values.detach().to("cpu", torch.float32).reshape(-1, self.dim).numpy()
        if v.shape[0] != len(r):
            raise ValueError(f"{len(r)} row ids but values of shape {tuple(values.shape)}")
        v = self._round(v)
        with self._lock:
            self._check_open()
            freq, hit, hit_slots = self._access(r)
            self._slot_data[hit_slots] = v[hit]
            self._slot_dirty[hit_slots] = True
            miss = np.flatnonzero(~hit)
            if len(miss):
                missed, first = np.unique(r[miss], return_index=True)
                if len(missed) != len(miss):
                    raise ValueError(f"{self.path}: write needs distinct row ids")
                index = miss[first]
                self._install(missed, v[index], freq[index], hit_slots, dirty=True)

    def write_range(self, start: int, values: Tensor) -> None:
        """Store [n, dim] ``values`` at rows [start, start + n) straight into the file.

        The bulk path for initialisation and import: sequential, not journaled (a crash during
        it leaves a table that must be rebuilt - its checksum is already marked stale), about as
        fast as the disk writes. Pending journaled writes are applied first, so a later journal
        replay can never overwrite these rows with older values; cached copies are updated.
        An fp8 file takes packed uint8 rows [n, dim + dim/32] (``tables.fp8.pack_rows``).
        """
        if self.dtype == fp8.FP8:
            if values.dtype != torch.uint8 or values.dim() != 2 or values.shape[1] != self._width:
                raise ValueError(
                    f"{self.path}: an fp8 table takes packed uint8 rows [n, {self._width}] "
                    f"(tables.fp8.pack_rows), got {values.dtype} {list(values.shape)}"
                )
            stored = np.ascontiguousarray(values.detach().to("cpu").numpy())
        else:
            v = self._round(values.detach().to("cpu", torch.float32).reshape(-1, self.dim).numpy())
            stored = np.ascontiguousarray(self._to_storage(v))
        stop = start + stored.shape[0]
        if start < 0 or stop > self.num_rows:
            raise IndexError(f"{self.path}: rows [{start}, {stop}) outside [0, {self.num_rows})")
        with self._lock:
            self._check_open()
            self._flush_locked()
            self._begin_writes()
            # pwrite, not the memory map: pages written once for initialisation should not stay
            # mapped into this process (they would count as its resident memory).
            row_bytes = self._row_bytes
            _write_all(self._fd, memoryview(stored).cast("B"), DATA_OFFSET + start * row_bytes)
            slots = self._find(np.arange(start, stop))
            cached = slots >= 0
            if cached.any():
                fresh = stored[cached]
                self._slot_data[slots[cached]] = (
                    fresh if self._cache_packed else self._from_storage(fresh)
                )

    def zero_(self) -> None:
        """Set every row to zero. A file never written since creation is all holes already;
        otherwise the data region is cut off and re-extended, which leaves it sparse again."""
        with self._lock:
            self._check_open()
            self._flush_locked()
            self._drop_cache()
            fresh = not self._written and _is_hole(self._fd, DATA_OFFSET, self._data_bytes())
            self._begin_writes()  # close() then records the (cheap, all-hole) checksum
            if fresh:
                return
            self._mm.flush()
            os.ftruncate(self._fd, DATA_OFFSET)
            os.ftruncate(self._fd, DATA_OFFSET + self._data_bytes())
            os.fsync(self._fd)

    def _read_file_rows(self, rows: np.ndarray) -> np.ndarray:
        """[n] sorted distinct ids -> [n, dim] stored rows, with many reads in flight.

        A missed row is a random 4 KB read (the map is MADV_RANDOM); read by page faults one
        after another, each would wait for the last. Up to ``2 * _READER_MIN_ROWS`` misses, and
        for every fp8 (served) table, the pages of all the rows are first advised
        ``WILLNEED`` (the kernel queues every read at once), then copied in one gather that
        waits for reads already in flight: 90 cold rows in 1.2 ms, against 2.1 ms over the
        reader pool and 5.6 ms by faults alone (500 rows: 6.1 / 9.3 / 29.8 ms; 2,000 rows:
        19.8 / 21.4 / 102 ms; ``benchmarks/tiers.py reads``, docs/benchmarks.md).
        Above that, on fp32 and bf16 stores (training's large batches of misses), the rows are
        read inline, in timed chunks (64 rows, then 4x larger up to 4,096), while their pages
        are in the page cache (a chunk copies at < 2 us a row); from the first chunk that had
        to wait for the device, the rest goes to a pool of readers that keeps ``_READERS``
        faults outstanding (``torch.index_select`` releases the GIL while it copies, and copies
        rows 3-4x faster than numpy's fancy indexing on a map). Inline, a warm file costs no
        thread handoffs (a warm pass's gathers took 209 ms through the pool of 64, 126 ms
        inline; docs/benchmarks.md, goal 3); a cold one pays one serial chunk of 64 faults
        (~3 ms at the ~51 us a fault above). A chunk with under ~4% of its rows on the device
        passes for resident: mixed files read those few rows one fault at a time.
        """
        if len(rows) < 2 * _READER_MIN_ROWS or self.dtype == fp8.FP8:
            self._advise_willneed(rows)
            return _take(self._mm, rows)
        out = np.empty((len(rows), self._width), dtype=self._np_dtype)
        file, index, into = (
            torch.from_numpy(self._mm),
            torch.from_numpy(rows),
            torch.from_numpy(out),
        )

        def read(span: tuple[int, int]) -> None:  # torch releases the GIL while it copies
            torch.index_select(file, 0, index[span[0] : span[1]], out=into[span[0] : span[1]])

        done, chunk = 0, _PROBE_ROWS
        while done < len(rows):
            stop = min(len(rows), done + chunk)
            start_time = time.perf_counter()
            read((done, stop))
            waited = time.perf_counter() - start_time > (stop - done) * _RESIDENT_ROW_SECONDS
            done, chunk = stop, min(4 * chunk, _MAX_INLINE_CHUNK)
            if waited:
                break
        if done == len(rows):
            return out
        bounds = np.linspace(
            done, len(rows), max(1, min(_READERS, (len(rows) - done) // _READER_MIN_ROWS)) + 1
        )
        spans = list(zip(bounds[:-1].astype(int), bounds[1:].astype(int), strict=True))
        list(_reader_pool().map(read, spans))
        return out

    def _data_bytes(self) -> int:
        return self.num_rows * self._row_bytes

    def flush(self) -> None:
        """Write every dirty cached row back (one journaled batch), then checkpoint."""
        with self._lock:
            self._check_open()
            self._flush_locked()

    def _flush_locked(self) -> None:
        dirty = np.flatnonzero(self._slot_dirty[: self._used])
        self._write_back(self._slot_row[dirty], self._slot_data[dirty])
        self._slot_dirty[dirty] = False
        if self._journal_bytes:  # else every in-place write is synced already: skip the fsyncs
            self._checkpoint()

    def sync(self) -> None:
        """:meth:`flush`, then make the file's data durable (``fsync``), bulk writes included:
        what a caller needs before recording that a table is complete."""
        with self._lock:
            self._check_open()
            self._flush_locked()
            os.fsync(self._fd)

    def snapshot(self, dest: str | os.PathLike[str]) -> int:
        """Copy the rows as they are now into a new file ``dest``; -> its data checksum.

        For training checkpoints (``engramlm.checkpoint``): the live file keeps changing after
        a checkpoint, so the checkpoint holds a copy. Flushes first; the copy is sparse where
        this file is, carries the data checksum in its header (so it is itself a valid, closed
        table file) and is fsync'd. Costs one read of the written data and one write of it:
        O(table bytes) per checkpoint, seconds per GB. Writers wait meanwhile (the lock).
        """
        dest = Path(dest)
        with self._lock:
            self._check_open()
            self._flush_locked()
            end = os.fstat(self._fd).st_size
            fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, end)
                crc = _copy_data(self._fd, fd, end, dst_is_new=True)
                header = _header_bytes(self._code, self.num_rows, self.dim, crc, _CRC_VALID)
                _write_all(fd, header, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        log.debug("%s: snapshot to %s (crc %#010x)", self.path, dest, crc)
        return crc

    def restore(self, snapshot: str | os.PathLike[str]) -> None:
        """Make every row what it is in ``snapshot`` (a file from :meth:`snapshot`), in place.

        Resuming a run rolls the live file back to its checkpoint this way. Cached rows (dirty
        ones included) and the journal are dropped: they are newer than the snapshot. The data
        checksum is marked stale first, so an interrupted restore leaves a file that says so;
        running the restore again completes it (the snapshot is only read). Refuses a snapshot
        of another shape or dtype, or whose data does not match its checksum (naming it).
        """
        snapshot = Path(snapshot)
        code, num_rows, dim, expected = _read_snapshot_header(snapshot)
        if (code, num_rows, dim) != (self._code, self.num_rows, self.dim):
            raise TableFileError(
                f"{snapshot}: [{num_rows}, {dim}] {_DTYPES[code][0]} snapshot, but {self.path} "
                f"is [{self.num_rows}, {self.dim}] {self.dtype}"
            )
        src = os.open(snapshot, os.O_RDONLY)
        try:
            with self._lock:
                self._check_open()
                self._drop_cache()
                os.ftruncate(self._jfd, 0)  # older than the snapshot: must never be replayed
                os.fsync(self._jfd)
                self._journal_bytes = 0
                self._begin_writes()
                actual = _copy_data(src, self._fd, os.fstat(self._fd).st_size)
                os.fsync(self._fd)
        finally:
            os.close(src)
        if actual != expected:
            raise TableFileError(
                f"{snapshot}: data checksum mismatch (corrupt table snapshot): header "
                f"{expected:#010x}, computed {actual:#010x}"
            )
        log.info("%s: restored from %s", self.path, snapshot)

    def _drop_cache(self) -> None:
        """Forget every cached row without writing it back."""
        self._slot_row[:] = -1
        self._slot_dirty[:] = False
        self._slot_freq[:] = 0
        self._used = 0
        self._keys = np.empty(0, dtype=np.int64)
        self._key_slots = np.empty(0, dtype=np.int64)
        if self._slot_of is not None:
            self._slot_of[:] = -1
        self._sketch = FrequencySketch(self.capacity)
        self._pending_rows, self._pending_slots, self._pending = [], [], 0

    def close(self) -> None:
        """Flush, record the data checksum unless the recorded one is current, release the file."""
        if self._closed:
            return
        self.flush()
        with self._warm_lock, self._lock:
            if self._written or self._crc_state != _CRC_VALID:
                self._data_crc, self._crc_state = self._data_checksum(), _CRC_VALID
                self._write_header()
            self._closed = True
            del self._mm  # the last reference: unmaps now
            os.close(self._fd)
            os.close(self._jfd)

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, float]:
        """Read hits and misses, rows evicted and written to the file, bytes of cached rows,
        pages :meth:`warm` asked the kernel to read ahead."""
        with self._lock:
            out: dict[str, float] = dict(self._stats)
            lookups = out["hits"] + out["misses"]
            out["hit_rate"] = out["hits"] / lookups if lookups else 0.0
            out["bytes_cached"] = self._used * self._slot_bytes
        return out

    # --- the cache ---------------------------------------------------------------------------
    def _access(
        self, rows: np.ndarray, slots: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Count one use of each row; refresh frequency and recency of the cached ones.

        ``slots``: ``_find(rows)`` when the caller has it. Returns (sketch frequency [n],
        cached mask [n], slots of the cached rows)."""
        self._settle()  # queued hits first: admission and eviction read their counts
        self._tick += 1
        freq = self._touch(rows)
        if slots is None:
            slots = self._find(rows)
        hit = slots >= 0
        hit_slots = slots[hit]
        self._slot_freq[hit_slots] = freq[hit]
        self._slot_tick[hit_slots] = self._tick
        return freq, hit, hit_slots

    def _touch(self, rows: np.ndarray, uses: np.ndarray | None = None) -> np.ndarray:
        freq, aged = self._sketch.increment(rows, uses)
        if aged:
            self._slot_freq >>= 1
        return freq

    def _find(self, rows: np.ndarray) -> np.ndarray:  # [n] ids -> [n] slots, -1 when not cached
        if self._slot_of is not None:
            return self._slot_of[rows].astype(np.int64)
        if len(self._keys) == 0:
            return np.full(len(rows), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._keys, rows), len(self._keys) - 1)
        return np.where(self._keys[pos] == rows, self._key_slots[pos], -1)

    def _install(
        self,
        rows: np.ndarray,
        values: np.ndarray,
        freq: np.ndarray,
        protected: np.ndarray,
        *,
        dirty: bool,
    ) -> None:
        """Offer sorted distinct uncached rows to the cache; write back what must reach the file.

        Rows not admitted are written through when ``dirty``; evicted dirty rows are written back.
        Both go to the file in one journaled batch.
        """
        admitted, slots, evicted = self._admit(freq, protected)
        dirty_evicted = evicted[self._slot_dirty[evicted]]
        back_rows = [self._slot_row[dirty_evicted]]
        back_values = [self._slot_data[dirty_evicted]]  # fancy indexing copies before refill
        if dirty:
            rejected = np.ones(len(rows), dtype=bool)
            rejected[admitted] = False
            back_rows.append(rows[rejected])
            back_values.append(values[rejected])
        self._index_update(self._slot_row[evicted], rows[admitted], slots)
        self._slot_row[slots] = rows[admitted]
        _put(self._slot_data, slots, _take(values, admitted))
        self._slot_dirty[slots] = dirty
        self._slot_freq[slots] = freq[admitted]
        self._slot_tick[slots] = self._tick
        self._stats["evictions"] += len(evicted)
        self._write_back(np.concatenate(back_rows), np.concatenate(back_values))

    def _admit(self, freq: np.ndarray, protected: np.ndarray) -> tuple[np.ndarray, ...]:
        """TinyLFU duel: -> (admitted candidate indices, their slots, slots whose row is evicted).

        Free slots take the most frequent candidates; each remaining candidate, hottest first,
        is paired with a victim, coldest first, and wins only if strictly more frequent. Both
        orders are monotone, so the winners are a prefix. ``protected`` slots (used by this
        call) and slots filled by it are never victims.
        """
        none = np.empty(0, dtype=np.int64)
        if self.capacity == 0 or len(freq) == 0:
            return none, none, none
        order = np.argsort(-freq.astype(np.int16), kind="stable")
        filled = self._used
        n_fill = min(self.capacity - filled, len(freq))
        fill_slots = np.arange(filled, filled + n_fill)
        self._used += n_fill
        rest = order[n_fill:]
        if len(rest) == 0:
            return order[:n_fill], fill_slots, none
        victims = self._victims(len(rest), filled, protected)
        rest = rest[: len(victims)]
        wins = freq[rest] > self._slot_freq[victims]
        n_win = len(wins) if wins.all() else int(np.argmin(wins))
        victims = victims[:n_win]
        admitted = np.concatenate([order[:n_fill], rest[:n_win]])
        return admitted, np.concatenate([fill_slots, victims]), victims

    def _victims(self, k: int, limit: int, protected: np.ndarray) -> np.ndarray:
        """Up to ``k`` evictable slots in [0, limit), least frequent (then least recent) first."""
        # A boolean mask, not np.setdiff1d/np.isin: those sort or hash the whole cache per batch.
        evictable = np.ones(limit, dtype=bool)
        evictable[protected[protected < limit]] = False
        pool = None
        if limit > _VICTIM_SAMPLE and k <= _VICTIM_SAMPLE // 4:
            sample = self._rng.integers(0, limit, size=_VICTIM_SAMPLE)
            sample = sample[evictable[sample]]
            evictable_sample = np.zeros(limit, dtype=bool)
            evictable_sample[sample] = True  # deduplicates
            pool = np.flatnonzero(evictable_sample)
            if len(pool) < k:
                pool = None
        if pool is None:
            pool = np.flatnonzero(evictable)
        score = self._slot_freq[pool] + self._slot_tick[pool] / (self._tick + 1.0)
        if k < len(pool):
            pick = np.argpartition(score, k - 1)[:k]
            pool, score = pool[pick], score[pick]
        return pool[np.argsort(score, kind="stable")]

    def _index_update(self, removed: np.ndarray, added: np.ndarray, slots: np.ndarray) -> None:
        """Keep ``_slot_of`` (O(batch)), or ``_keys`` (sorted cached ids) and ``_key_slots``
        (O(cache) array moves), in step."""
        if self._slot_of is not None:
            self._slot_of[removed] = -1
            self._slot_of[added] = slots
            return
        keys, key_slots = self._keys, self._key_slots
        if len(removed):
            keep = np.ones(len(keys), dtype=bool)
            keep[np.searchsorted(keys, removed)] = False
            keys, key_slots = keys[keep], key_slots[keep]
        if len(added):
            order = np.argsort(added, kind="stable")
            added, slots = added[order], slots[order]
            at = np.searchsorted(keys, added)
            keys, key_slots = np.insert(keys, at, added), np.insert(key_slots, at, slots)
        self._keys, self._key_slots = keys, key_slots


_STORE_FILES = ("weight", "exp_avg", "exp_avg_sq")


def disk_table(
    path: str | os.PathLike[str],
    num_rows: int,
    dim: int,
    *,
    cache_bytes: int,
    device: torch.device | str | None = "cpu",
    create: bool = True,
    init: bool = True,
    dtype: torch.dtype = torch.float32,
) -> OffloadedTable:
    """An :class:`OffloadedTable` over three :class:`DiskStore` files in directory ``path``.

    ``path/weight.engt``, ``path/exp_avg.engt``, ``path/exp_avg_sq.engt`` (plus their journals):
    one directory per table keeps the row-aligned stores together. ``cache_bytes`` is split half
    to the weights (read by every lookup and every step), a quarter to each moment (read only
    by the optimiser). ``create=True`` makes new files (refusing to overwrite) and, with
    ``init``, initialises them with ``reset_parameters()`` (``init=False`` leaves zeros for a
    caller that initialises the whole model itself, so the rows are written once);
    ``create=False`` opens existing files and checks the shape. ``device`` is where rows are
    delivered (``None``: the device of the ids, as in :class:`OffloadedTable`).

    ``dtype=torch.float8_e4m3fn`` makes a read-only fp8 table (``tables.fp8``): one file,
    ``path/weight.engt``, of packed rows and no moment files; the whole ``cache_bytes`` goes
    to its cache; ``create=True`` leaves it zero for the caller to fill with ``write_range``.
    """
    directory = Path(path)
    if dtype == fp8.FP8:
        file = directory / f"{_STORE_FILES[0]}.engt"
        if create:
            directory.mkdir(parents=True, exist_ok=True)
            store = DiskStore.create(file, num_rows, dim, dtype=dtype, cache_bytes=cache_bytes)
        else:
            store = DiskStore.open(file, cache_bytes=cache_bytes)
        if (store.num_rows, store.dim, store.dtype) != (num_rows, dim, dtype):
            store.close()
            raise ValueError(
                f"{file} is [{store.num_rows}, {store.dim}] {store.dtype}, expected "
                f"[{num_rows}, {dim}] {dtype}"
            )
        return OffloadedTable(store, device=device)
    files = [directory / f"{name}.engt" for name in _STORE_FILES]
    budgets = (cache_bytes // 2, cache_bytes // 4, cache_bytes // 4)
    if create:
        directory.mkdir(parents=True, exist_ok=True)
        stores = [
            DiskStore.create(f, num_rows, dim, cache_bytes=b)
            for f, b in zip(files, budgets, strict=True)
        ]
    else:
        stores = [DiskStore.open(f, cache_bytes=b) for f, b in zip(files, budgets, strict=True)]
        for store in stores:
            if (store.num_rows, store.dim) != (num_rows, dim):
                for s in stores:
                    s.close()
                raise ValueError(
                    f"{store.path} is [{store.num_rows}, {store.dim}], expected [{num_rows}, {dim}]"
                )
    table = OffloadedTable(*stores, device=device)
    if create and init:
        table.reset_parameters()
        table.flush()
    return table
