"""DiskStore: exact for any cache size, durable, crash-consistent; trains like SparseAdam;
warming is only a hint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from engramlm.tables import DeviceTable, disk
from engramlm.tables.disk import DiskStore, FrequencySketch, TableFileError, disk_table
from engramlm.tables.offload import OffloadedTable, RowStore, TableAdam

DIM = 8


def _row_cost(dim: int = DIM) -> int:
    from engramlm.tables.disk import _ROW_OVERHEAD_BYTES

    return 4 * dim + _ROW_OVERHEAD_BYTES


def _filled(path: Path, num_rows: int, value: float = 0.0, **kw: object) -> DiskStore:
    store = DiskStore.create(path, num_rows, DIM, **kw)  # type: ignore[arg-type]
    store.write(torch.arange(num_rows), torch.full((num_rows, DIM), value))
    return store


def test_disk_store_is_a_row_store(tmp_path: Path) -> None:
    with DiskStore.create(tmp_path / "t", 4, DIM) as store:
        assert isinstance(store, RowStore)


def test_round_trip_survives_close_and_reopen(tmp_path: Path) -> None:
    values = torch.randn(100, DIM)
    with DiskStore.create(tmp_path / "t", 100, DIM, cache_bytes=1 << 20) as store:
        store.write(torch.arange(100), values)
        assert torch.equal(store.read(torch.arange(100)), values)
    with DiskStore.open(tmp_path / "t", verify=True) as store:
        assert torch.equal(store.read(torch.tensor([5, 0, 99, 5])), values[[5, 0, 99, 5]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_storage_reads_what_was_written_rounded(tmp_path: Path, dtype: torch.dtype) -> None:
    values = torch.randn(50, DIM)
    rounded = values.to(dtype).float()
    with DiskStore.create(tmp_path / "t", 50, DIM, dtype=dtype, cache_bytes=10 * _row_cost()) as s:
        s.write(torch.arange(50), values)
        assert torch.equal(s.read(torch.arange(50)), rounded)  # mixed cache hits and file reads
    assert os.path.getsize(tmp_path / "t") == 4096 + 50 * DIM * 2
    with DiskStore.open(tmp_path / "t") as s:
        assert torch.equal(s.read(torch.arange(50)), rounded)


@pytest.mark.parametrize(
    ("cache_rows", "victim_sample", "reader_min"),
    [(0, 0, 0), (3, 0, 0), (16, 0, 0), (200, 0, 0), (64, 16, 0), (0, 0, 8), (40, 0, 8)],
)
def test_reads_return_last_write_whatever_the_cache_size(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cache_rows: int,
    victim_sample: int,
    reader_min: int,
) -> None:
    """Property-style: random batches (some larger than the cache, some large enough for the
    torch row moves) against a numpy reference; reads with duplicates, and sorted distinct ones
    (what the offloaded table asks for).

    ``victim_sample`` > 0 shrinks the threshold above which victims come from a random sample;
    ``reader_min`` > 0 the one above which misses go to the pool of readers.
    """
    if victim_sample:
        monkeypatch.setattr(disk, "_VICTIM_SAMPLE", victim_sample)
    if reader_min:
        monkeypatch.setattr(disk, "_READER_MIN_ROWS", reader_min)
    num_rows, rng = 400, np.random.default_rng(cache_rows + reader_min)
    reference = np.zeros((num_rows, DIM), dtype=np.float32)
    store = DiskStore.create(tmp_path / "t", num_rows, DIM, cache_bytes=cache_rows * _row_cost())
    # 200 rows of 400: the direct row -> slot map (1,600 bytes) is smaller than the sorted
    # index (3,200) and its budget; smaller caches search sorted ids
    direct = cache_rows == 200
    assert (store._slot_of is not None) == direct
    expected = (
        (cache_rows * _row_cost() - 4 * num_rows) // (_row_cost() - 16) if direct else cache_rows
    )
    assert store.capacity == expected
    zipf = np.minimum(rng.zipf(1.3, size=100_000), num_rows) - 1  # skewed, like n-gram traffic
    for step in range(300):
        n = int(rng.integers(1, 40 if step % 3 else 200))
        rows = np.unique(rng.choice(zipf, size=n))
        if rng.random() < 0.5:
            values = rng.standard_normal((len(rows), DIM)).astype(np.float32)
            store.write(torch.from_numpy(rows), torch.from_numpy(values))
            reference[rows] = values
        else:
            if rng.random() < 0.5:
                rows = rng.choice(zipf, size=n)  # duplicates allowed on reads
            got = store.read(torch.from_numpy(rows)).numpy()
            np.testing.assert_array_equal(got, reference[rows], err_msg=f"step {step}")
        if step % 97 == 96:
            store.close()
            store = DiskStore.open(tmp_path / "t", cache_bytes=cache_rows * _row_cost())
    np.testing.assert_array_equal(store.read(torch.arange(num_rows)).numpy(), reference)
    store.close()


def test_eviction_writes_dirty_rows_back(tmp_path: Path) -> None:
    store = DiskStore.create(tmp_path / "t", 64, DIM, cache_bytes=4 * _row_cost())
    values = torch.randn(4, DIM)
    store.write(torch.arange(4), values)  # cached, dirty, used once
    for _ in range(3):  # rows used more often displace them
        store.read(torch.arange(4, 8))
    assert store.stats()["evictions"] == 4 and store.stats()["writebacks"] == 4
    assert np.array_equal(_raw_rows(tmp_path / "t")[:4], values.numpy())  # in the file
    store.close()


def test_a_file_has_one_writer(tmp_path: Path) -> None:
    with DiskStore.create(tmp_path / "t", 4, DIM):
        with pytest.raises(TableFileError, match="t: already open"):
            DiskStore.open(tmp_path / "t")


def test_stats_count_hits_misses_evictions_writebacks(tmp_path: Path) -> None:
    store = DiskStore.create(tmp_path / "t", 100, DIM, cache_bytes=10 * _row_cost())
    store.read(torch.arange(10))  # 10 misses, all admitted into free slots
    store.read(torch.arange(10))  # 10 hits
    store.write(torch.arange(5), torch.ones(5, DIM))  # 5 dirty cached rows
    store.flush()  # 5 written back
    stats = store.stats()
    assert stats == {
        "hits": 10,
        "misses": 10,
        "evictions": 0,
        "writebacks": 5,
        "pages_warmed": 0,
        "hit_rate": 0.5,
        "bytes_cached": 10 * DIM * 4,
    }
    for _ in range(3):  # rows 50..54 become more frequent than the cached ones...
        store.read(torch.arange(50, 55))
    assert store.stats()["evictions"] == 5  # ...and displace five of them
    store.close()


def test_tinylfu_keeps_hot_rows_under_a_scan(tmp_path: Path) -> None:
    """A one-off scan of cold rows must not flush the hot set (LRU would lose it all)."""
    store = DiskStore.create(tmp_path / "t", 10_000, DIM, cache_bytes=100 * _row_cost())
    hot = torch.arange(100)
    for _ in range(5):
        store.read(hot)
    for start in range(100, 500, 100):  # within one sketch sample (10x the cache): no aging
        store.read(torch.arange(start, start + 100))
    before = store.stats()["hits"]
    store.read(hot)
    assert store.stats()["hits"] - before == 100
    store.close()


def test_sketch_estimates_frequency_and_ages() -> None:
    sketch = FrequencySketch(capacity=1000)
    rows = np.arange(10, dtype=np.int64)
    for _ in range(4):
        estimate, _ = sketch.increment(rows)
    assert (estimate == 4).all()
    while not sketch.increment(np.arange(1000, 1100, dtype=np.int64))[1]:
        pass
    assert (sketch.counts.max() <= FrequencySketch.CAP) and sketch.additions < sketch.sample_size


def test_truncated_file_is_refused_naming_it(tmp_path: Path) -> None:
    DiskStore.create(tmp_path / "t", 10, DIM).close()
    with open(tmp_path / "t", "r+b") as f:
        f.truncate(4096 + 9 * DIM * 4)
    with pytest.raises(TableFileError, match=r"t: file is .* bytes but its header implies"):
        DiskStore.open(tmp_path / "t")


@pytest.mark.parametrize(
    ("offset", "patch", "problem"),
    [(0, b"NOTATABL", "not an engramlm table"), (8, b"\x07", "format version 7"),
     (16, b"\x0b", "header checksum mismatch")],
)  # fmt: skip
def test_bad_header_is_refused_naming_it(
    tmp_path: Path, offset: int, patch: bytes, problem: str
) -> None:
    DiskStore.create(tmp_path / "t", 10, DIM).close()
    with open(tmp_path / "t", "r+b") as f:
        f.seek(offset)
        f.write(patch)
    with pytest.raises(TableFileError, match=f"{tmp_path / 't'}: {problem}"):
        DiskStore.open(tmp_path / "t")


def test_corrupt_data_fails_verification(tmp_path: Path) -> None:
    _filled(tmp_path / "t", 10, 1.0).close()
    with DiskStore.open(tmp_path / "t", verify=True) as store:
        assert store.verify()
    with open(tmp_path / "t", "r+b") as f:
        f.seek(4096 + 3 * DIM * 4 + 1)
        f.write(b"\xff")
    DiskStore.open(tmp_path / "t").close()  # opening does not read the data...
    with pytest.raises(TableFileError, match=r"t: data checksum mismatch"):
        DiskStore.open(tmp_path / "t", verify=True)  # ...verifying does


def test_creating_a_large_table_is_sparse(tmp_path: Path) -> None:
    num_rows = 200_000_000  # 6.4 GB declared
    with DiskStore.create(tmp_path / "big", num_rows, DIM, cache_bytes=1 << 20) as store:
        store.write(torch.tensor([num_rows - 1]), torch.ones(1, DIM))
    stat = os.stat(tmp_path / "big")
    assert stat.st_size == 4096 + num_rows * DIM * 4
    assert stat.st_blocks * 512 < 1 << 20
    with DiskStore.open(tmp_path / "big", verify=True) as store:  # checksummed at close
        got = store.read(torch.tensor([0, num_rows - 1]))
    assert torch.equal(got, torch.stack([torch.zeros(DIM), torch.ones(DIM)]))


def test_snapshot_is_sparse_and_restore_rolls_back_later_writes(tmp_path: Path) -> None:
    num_rows = 20_000_000  # 640 MB declared: ten 64 MiB checksum chunks, nearly all holes
    first, later = torch.tensor([3, num_rows - 1]), torch.tensor([5, num_rows // 2])
    with DiskStore.create(tmp_path / "live", num_rows, DIM, cache_bytes=1 << 20) as store:
        store.write(first, torch.ones(2, DIM))
        crc = store.snapshot(tmp_path / "snap")
        store.write(later, torch.full((2, DIM), 2.0))  # after the snapshot: rolled back below
        store.write(first[:1], torch.full((1, DIM), 3.0))
        store.flush()
        store.restore(tmp_path / "snap")
        got = store.read(torch.cat([first, later]))
    assert os.stat(tmp_path / "snap").st_blocks * 512 < 1 << 20
    disk.verify_snapshot(tmp_path / "snap", crc)
    assert torch.equal(got, torch.cat([torch.ones(2, DIM), torch.zeros(2, DIM)]))
    with DiskStore.open(tmp_path / "live") as store:  # the restore is durable, journal empty
        assert torch.equal(store.read(torch.cat([first, later])), got)


def test_restore_refuses_a_snapshot_of_another_shape_naming_it(tmp_path: Path) -> None:
    with DiskStore.create(tmp_path / "other", 10, DIM) as other:
        other.snapshot(tmp_path / "snap")
    with DiskStore.create(tmp_path / "live", 11, DIM) as store:
        with pytest.raises(TableFileError, match=r"snap: \[10, 8\] torch.float32 snapshot"):
            store.restore(tmp_path / "snap")


def test_corrupt_snapshot_fails_verification_naming_it(tmp_path: Path) -> None:
    with _filled(tmp_path / "live", 100, value=1.0) as store:
        crc = store.snapshot(tmp_path / "snap")
    with open(tmp_path / "snap", "r+b") as f:
        f.seek(4096 + 40 * DIM * 4)
        f.write(b"\xff")  # 1.0 is 00 00 80 3f: its first byte was zero
    with pytest.raises(TableFileError, match=r"snap: data checksum mismatch"):
        disk.verify_snapshot(tmp_path / "snap", crc)


_CRASHING_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from engramlm.tables import disk

    path, stage = sys.argv[1], sys.argv[2]
    disk._IN_PLACE_CHUNK_BYTES = 16 * 8 * 4  # 16 rows per in-place chunk
    store = disk.DiskStore.open(path, cache_bytes=1 << 20)
    store.write(torch.arange(64), torch.full((64, 8), 1.0))  # all cached, dirty

    def die(at):
        if at == stage:
            os.kill(os.getpid(), signal.SIGKILL)

    disk._fault_hook = die
    store.flush()
    """
)


def _crash_mid_flush(path: Path, stage: str) -> None:
    _filled(path, 64, 0.0).close()
    result = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(path), stage],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()


def _raw_rows(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<f4", offset=4096).reshape(-1, DIM)


@pytest.mark.parametrize("stage", ["journaled", "in_place"])
def test_journal_replay_after_sigkill_mid_flush(tmp_path: Path, stage: str) -> None:
    path = tmp_path / "t"
    _crash_mid_flush(path, stage)
    torn = _raw_rows(path)
    assert ((torn == 0).all(axis=1) | (torn == 1).all(axis=1)).all()  # never a torn row
    new_rows = int((torn == 1).all(axis=1).sum())
    assert new_rows == (0 if stage == "journaled" else 16)  # the crash left old rows in place
    assert os.path.getsize(str(path) + ".journal") > 0
    with DiskStore.open(path, cache_bytes=0) as store:
        assert torch.equal(store.read(torch.arange(64)), torch.ones(64, DIM))
    assert os.path.getsize(str(path) + ".journal") == 0


def test_incomplete_journal_record_is_discarded(tmp_path: Path) -> None:
    path = tmp_path / "t"
    _crash_mid_flush(path, "journaled")
    journal = Path(str(path) + ".journal")
    journal.write_bytes(journal.read_bytes()[:-5])  # the record's tail never reached the disk
    with DiskStore.open(path, cache_bytes=0) as store:
        assert torch.equal(store.read(torch.arange(64)), torch.zeros(64, DIM))


def test_disk_table_trains_like_sparse_adam(tmp_path: Path) -> None:
    """TableAdam over DiskStores (small caches: evictions every step) = SparseAdam, bitwise."""
    torch.manual_seed(0)
    num_rows = 300
    table = disk_table(tmp_path / "table", num_rows, DIM, cache_bytes=4 * 40 * _row_cost())
    assert isinstance(table, OffloadedTable)
    reference = DeviceTable(num_rows, DIM, sparse_grad=True)
    with torch.no_grad():
        reference.weight.copy_(table.weight_store.read(torch.arange(num_rows)))
    lr, betas = 1e-2, (0.9, 0.95)
    sparse_adam = torch.optim.SparseAdam(reference.parameters(), lr=lr, betas=betas)
    table_adam = TableAdam([table], lr=lr, betas=betas)
    for _ in range(5):
        rows = torch.randint(0, num_rows, (4, 16))
        grad = torch.randn(4, 16, DIM)
        (reference.lookup(rows) * grad).sum().backward()
        sparse_adam.step()
        sparse_adam.zero_grad()
        (table.lookup(rows) * grad).sum().backward()
        table_adam.step()
        table_adam.zero_grad()
    assert table.weight_store.stats()["evictions"] > 0
    all_rows = torch.arange(num_rows)
    assert torch.equal(table.weight_store.read(all_rows), reference.weight.detach())
    table.flush()
    for store in (table.weight_store, table.exp_avg, table.exp_avg_sq):
        store.close()
    reopened = disk_table(tmp_path / "table", num_rows, DIM, cache_bytes=0, create=False)
    assert torch.equal(reopened.weight_store.read(all_rows), reference.weight.detach())


def test_write_range_overrides_cached_and_journaled_rows(tmp_path: Path) -> None:
    path = tmp_path / "t.engt"
    with DiskStore.create(path, 100, 4, cache_bytes=1 << 20) as store:
        store.write(torch.arange(10, 20), torch.full((10, 4), 7.0))  # dirty in the cache
        bulk = torch.arange(200.0).view(50, 4)
        store.write_range(5, bulk)  # rows 5..54
        assert torch.equal(store.read(torch.arange(5, 55)), bulk)
        assert torch.equal(store.read(torch.arange(0, 5)), torch.zeros(5, 4))
    with DiskStore.open(path, verify=True) as store:  # replaying the journal changes nothing
        assert torch.equal(store.read(torch.arange(5, 55)), bulk)


def test_zero_leaves_zeros_and_a_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "t.engt"
    rows = 1 << 16
    with DiskStore.create(path, rows, 16, cache_bytes=1 << 16) as store:
        store.write_range(0, torch.ones(rows, 16))
        store.write(torch.tensor([3]), torch.full((1, 16), 2.0))
        store.zero_()
        assert not store.read(torch.tensor([0, 3, rows - 1])).any()
    assert path.stat().st_blocks * 512 < rows * 16 * 4 // 8  # the 4 MB of rows are holes again
    with DiskStore.open(path, verify=True) as store:
        assert not store.read(torch.arange(rows)).any()


# ---------------------------------------------------------------------------------------------
# warm: a read-ahead hint for rows a later batch will read

needs_fadvise = pytest.mark.skipif(
    not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform: warm is a no-op"
)


@needs_fadvise
def test_warm_changes_no_value_cache_entry_or_count(tmp_path: Path) -> None:
    """Rows held dirty in the cache stay dirty and correct; only uncached rows' pages are hinted."""
    with DiskStore.create(tmp_path / "t", 1000, DIM, cache_bytes=20 * _row_cost()) as store:
        store.write_range(0, torch.ones(1000, DIM))
        store.write(torch.arange(10), torch.full((10, DIM), 5.0))  # cached, dirty
        before = store.stats()
        store.warm(np.array([9, 3, 3, 500, 999, 0, 500]))  # any order, repeats, cached or not
        after = store.stats()
        assert after == {**before, "pages_warmed": 2}  # the pages of rows 500 and 999
        assert torch.equal(store.read(torch.arange(10)), torch.full((10, DIM), 5.0))
        store.flush()
        assert store.stats()["writebacks"] == before["writebacks"] + 10  # still dirty
    with DiskStore.open(tmp_path / "t") as store:
        want = torch.cat([torch.full((10, DIM), 5.0), torch.ones(990, DIM)])
        assert torch.equal(store.read(torch.arange(1000)), want)


@needs_fadvise
def test_warm_hints_each_run_of_adjacent_pages_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n, advice))
    )
    page, willneed = disk._PAGE, os.POSIX_FADV_WILLNEED
    if page != disk.DATA_OFFSET:
        pytest.skip(f"expected offsets assume 4 KB pages, this machine's are {page} B")
    with DiskStore.create(tmp_path / "t", 1000, 8, cache_bytes=0) as store:  # 32 B rows
        rows_per_page = page // 32
        store.warm(torch.tensor([0, rows_per_page - 1, rows_per_page, 5 * rows_per_page]))
    with DiskStore.create(tmp_path / "u", 1000, 24, cache_bytes=0) as store:  # 96 B rows
        store.warm(torch.tensor([page // 96]))  # straddles the first two data pages
    data = disk.DATA_OFFSET
    assert calls == [
        (data, 2 * page, willneed),  # rows of the first two data pages: one hint
        (data + 5 * page, page, willneed),
        (data, 2 * page, willneed),
    ]


@needs_fadvise
def test_missed_rows_are_advised_before_they_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read's misses hint every page they touch (rows straddling two pages hint both), then
    return the stored values; cached rows are neither hinted nor read from the file."""
    with DiskStore.create(tmp_path / "t", 2000, 24, cache_bytes=1 << 20) as store:  # 96 B rows
        values = torch.randn(2000, 24)
        store.write_range(0, values)
        store.read(torch.tensor([7]))  # now cached
        advised: list[tuple[int, int]] = []
        real = os.posix_fadvise

        def record(fd: int, off: int, n: int, advice: int) -> None:
            assert advice == os.POSIX_FADV_WILLNEED
            advised.append((off, n))
            real(fd, off, n, advice)

        monkeypatch.setattr(os, "posix_fadvise", record)
        rows = torch.tensor([1999, 7, disk._PAGE // 96, 1000, 7])
        assert torch.equal(store.read(rows), values[rows])
        hinted = {off // disk._PAGE + i for off, n in advised for i in range(n // disk._PAGE)}
        want = set()
        for r in (1999, disk._PAGE // 96, 1000):  # not row 7: a cache hit
            start = disk.DATA_OFFSET + r * 96
            want |= {start // disk._PAGE, (start + 95) // disk._PAGE}
        assert hinted == want
        assert len(want) == 4  # row PAGE // 96 straddles two pages


def test_served_prefetch_of_cached_rows_gathers_at_once(tmp_path: Path) -> None:
    """Served on CPU, a prefetch whose rows are all in the row cache is gathered on the caller's
    thread (no thread handoff); one with a missed row goes to the prefetch thread. Both return
    the stored rows and count as prefetch hits; training always uses the thread."""
    table = disk_table(tmp_path / "table", 1000, DIM, cache_bytes=1 << 20, init=False)
    weights = torch.randn(1000, DIM)
    table.write_range(0, weights)  # the bulk path: written to the file, nothing cached
    table.eval()
    ids = torch.tensor([[3, 9], [9, 400]])
    assert torch.equal(table.lookup(ids), weights[ids])  # not prefetched: now cached
    assert table.prefetch_misses == 1
    table.prefetch(ids)
    assert table._pool is None  # gathered at once
    assert torch.equal(table.lookup(ids), weights[ids])
    distinct = torch.tensor([400, 3])  # few distinct rows: read without sorting them first
    table.prefetch(distinct)
    assert table._pool is None
    assert torch.equal(table.lookup(distinct), weights[distinct])
    with pytest.raises(IndexError, match=r"row out of range \[0, 1000\): got \[-1, 3\]"):
        table.prefetch(torch.tensor([3, -1]))  # checked by the store on this path
    table.prefetch(torch.tensor([3, 401]))  # 401 is not cached
    assert table._pool is not None
    assert torch.equal(table.lookup(torch.tensor([3, 401])), weights[[3, 401]])
    assert (table.prefetch_hits, table.prefetch_misses) == (3, 1)
    store = table.weight_store
    assert torch.equal(store.read_cached(torch.tensor([401, 3])), weights[[401, 3]])
    before = store.stats()
    assert store.read_cached(torch.tensor([3, 402])) is None  # 402 was never read
    assert store.stats() == before  # nothing counted
    table.close()


def test_warm_refuses_rows_out_of_range_naming_the_range(tmp_path: Path) -> None:
    with DiskStore.create(tmp_path / "t", 100, DIM) as store:
        with pytest.raises(IndexError, match=r"out of range \[0, 100\): got \[-1, 100\]"):
            store.warm(torch.tensor([5, 100, -1]))


def test_warm_after_close_is_a_value_error(tmp_path: Path) -> None:
    store = DiskStore.create(tmp_path / "t", 100, DIM)
    store.close()
    with pytest.raises(ValueError, match="t: store is closed"):
        store.warm(torch.tensor([5]))


@needs_fadvise
def test_offloaded_table_warms_the_moments_only_when_training(tmp_path: Path) -> None:
    table = disk_table(tmp_path / "table", 1000, DIM, cache_bytes=0)
    table.train()
    table.warm(torch.tensor([[1, 500], [999, 1]]))  # three pages
    assert [s.stats()["pages_warmed"] for s in table.stores] == [3, 3, 3]
    table.eval()  # inference reads the weights only
    table.warm(torch.tensor([700]))
    assert [s.stats()["pages_warmed"] for s in table.stores] == [4, 3, 3]
    table.close()


def test_full_hit_reads_are_counted_before_the_next_cache_decision(tmp_path: Path) -> None:
    """Reads that hit in full are queued, not counted at once; a read with a miss counts them
    first, so the sketch holds what counting each access at once gives (a write, then four
    reads: 5 uses), and the values read meanwhile are the cached ones."""
    store = DiskStore.create(tmp_path / "t", 1000, DIM, cache_bytes=100 * _row_cost())
    rows = torch.tensor([3, 7, 11])
    store.write(rows, torch.arange(3.0)[:, None].expand(3, DIM))  # cached (dirty): 1 use
    for _ in range(4):
        assert torch.equal(store.read(rows), torch.arange(3.0)[:, None].expand(3, DIM))
    assert store._pending == 4 * 3  # queued, not yet counted
    sketch = store._sketch
    ids = rows.numpy()

    def uses() -> np.ndarray:
        return sketch.counts.reshape(-1)[sketch._index(ids)].min(axis=0)

    assert (uses() == 1).all()
    store.read(torch.tensor([500]))  # a miss: the queue is counted before it is admitted
    assert store._pending == 0 and (uses() == 5).all()
    assert store.stats()["hits"] == 12 and store.stats()["misses"] == 1
    store.close()


@pytest.mark.parametrize("resident_row_seconds", [0.0, float("inf")])
def test_large_misses_go_to_the_readers_only_after_a_chunk_waited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resident_row_seconds: float
) -> None:
    """Misses past the inline threshold are read inline in timed chunks; the first chunk that
    took longer than a resident page would hands the rest to the pool of readers. Forced both
    ways (every chunk 'waited' / none did): the same rows, and the pool used or not."""
    monkeypatch.setattr(disk, "_RESIDENT_ROW_SECONDS", resident_row_seconds)
    monkeypatch.setattr(disk, "_READER_MIN_ROWS", 16)
    num_rows = 3000
    values = torch.randn(num_rows, DIM)
    store = DiskStore.create(tmp_path / "t", num_rows, DIM, cache_bytes=0)
    store.write_range(0, values)
    spans: list[tuple[int, int]] = []
    pool = disk._reader_pool()

    class Counting:
        def map(self, fn, items):  # type: ignore[no-untyped-def]
            items = list(items)
            spans.extend(items)
            return pool.map(fn, items)

    monkeypatch.setattr(disk, "_reader_pool", lambda: Counting())
    rows = torch.from_numpy(np.random.default_rng(0).integers(0, num_rows, size=2000))
    torch.testing.assert_close(store.read(rows), values[rows], rtol=0, atol=0)
    if resident_row_seconds == 0.0:  # the first chunk (64 rows) read inline, the rest pooled
        assert spans[0][0] == disk._PROBE_ROWS and spans[-1][1] == len(rows)
        assert len(spans) == min(disk._READERS, (len(rows) - disk._PROBE_ROWS) // 16)
    else:
        assert spans == []
    store.close()


@pytest.mark.parametrize("cache_rows", [0, 64])
def test_offloaded_table_asks_a_store_for_distinct_rows_only_with_a_row_cache(
    tmp_path: Path, cache_rows: int
) -> None:
    """With a row cache the offloaded table reads each distinct row once (the cache's
    bookkeeping is per row asked for); without one the store copies the rows as asked, repeats
    and all, from the file's pages. Same values either way."""
    values = torch.randn(100, DIM)
    store = DiskStore.create(tmp_path / "t", 100, DIM, cache_bytes=cache_rows * _row_cost())
    store.write_range(0, values)
    assert store.wants_distinct_reads == (cache_rows > 0)
    table = OffloadedTable(store, store, store)
    rows = torch.tensor([[3, 7, 3], [7, 7, 50]])
    with torch.no_grad():
        got = table.lookup(rows)
    torch.testing.assert_close(got, values[rows], rtol=0, atol=0)
    stats = store.stats()
    assert stats["hits"] + stats["misses"] == (3 if cache_rows else 6)
    table.close()
