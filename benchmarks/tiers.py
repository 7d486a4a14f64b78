"""Where can an Engram table live, and what does each tier cost? (SPEC §5)

One script, one subcommand per question; each prints the machine line and ratios measured side
by side in one run (calls interleaved, so machine noise hits every side alike):

- ``steps``: training step time against table size - device tables of 1e5, 1e6, 1e7 rows, the
  host tier at 1e7 and the disk tier at 1e8 - on one small model and the same real batches. The
  disk model gets what ``train``'s data loader gives it: the rows of batch i+1 warmed
  (``EngramLM.warm_tables``) on a background thread while step i runs (``--no-warm``: without;
  ``--compare-warm``: both, as two disk models with their own files, interleaved).
- ``cache``: the hash ids of the pydocs validation text replayed through in-memory tables and
  through disk tables with hot-row caches of several budgets: lookup throughput, hit rates,
  TinyLFU against an LRU simulation on the same stream, and a plot (docs/img).
- ``gather``: random-row ``index_select`` against a contiguous copy of the same bytes.
- ``reads``: how a disk store reads n cold rows (page cache dropped before each read): its own
  path (pages advised ``WILLNEED``, then one gather), the reader pool it used before, and page
  faults one after another.
- ``prefetch``: (CUDA only) host-pinned table with prefetch against the on-device table.
- ``inference``: the paper's Engram-27B table size (2 layers x 16 heads x 2,262,400 rows x 80
  dims) in files on disk under a small backbone: forward tokens/s against the same backbone
  without Engram, with the process's RSS and major page faults.

    .venv/bin/python benchmarks/tiers.py steps|cache|gather|reads|prefetch|inference [--help]

Large files go under ``--dir`` (default /tmp/engramlm-tiers) and are deleted at the end.

Disk tables here are built outside ``disk_table(create=True)``: the weight file is created
empty (sparse), then filled with N(0, 0.02^2) rows by sequential writes straight into its data
region, and the moment files stay holes (zeros: exactly their initial value). The library path
writes every row through the cache and journal, twice (see ``steps``' creation-rate line), which
takes too long at these sizes. The model around the table is built on the meta device with a
placeholder table, materialised, initialised, and only then given the disk table.
"""

from __future__ import annotations

import argparse
import dataclasses
import mmap
import os
import resource
import shutil
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, machine  # noqa: E402

from engramlm.config import EngramConfig, ModelConfig  # noqa: E402
from engramlm.data import PreparedCorpus, TrainBatches, ValBatches, prepare_corpus  # noqa: E402
from engramlm.model import EngramLM  # noqa: E402
from engramlm.tables import (  # noqa: E402
    DeviceTable,
    DiskStore,
    MemoryStore,
    OffloadedTable,
    TablePlan,
    disk_table,
)
from engramlm.tables.base import TABLE_INIT_STD  # noqa: E402
from engramlm.tables.disk import DATA_OFFSET  # noqa: E402
from engramlm.tables.hugepages import huge_page_share  # noqa: E402
from engramlm.tables.offload import row_chunks  # noqa: E402
from engramlm.train import TrainConfig, _bind_vocab, build_optimizers  # noqa: E402

GB = 1e9


# --- shared helpers ---------------------------------------------------------------------------
def backbone_config(corpus: PreparedCorpus, layers: int, hidden: int, seq: int) -> ModelConfig:
    D = hidden
    return ModelConfig(
        vocab_size=corpus.vocab_size,
        num_layers=layers,
        hidden_size=D,
        num_heads=max(1, D // 64),
        num_kv_heads=max(1, D // 128),
        ffn_hidden_size=8 * D // 3,
        max_seq_len=seq,
    )


def with_engram(backbone: ModelConfig, corpus: PreparedCorpus, engram: EngramConfig) -> ModelConfig:
    """``backbone`` with ``engram`` bound to the corpus' tokenizer (V', the filler pad id), as
    ``train`` binds it."""
    return _bind_vocab(dataclasses.replace(backbone, engram=engram), corpus)


def engram_for_rows(total_rows: int, hidden: int, layer: int = 1) -> EngramConfig:
    """Two orders x 8 heads of ``total_rows / 16`` rows each (rounded up to primes); dim 32."""
    per_head = total_rows // 16
    return EngramConfig(
        table_sizes=(per_head, per_head),
        embed_dim_per_ngram=hidden,
        layer_ids=(layer,),
        hc_mult=1,
    )


def meta_model(config: ModelConfig, corpus: PreparedCorpus) -> EngramLM:
    """The model with every Engram table a 1-row placeholder, to be replaced with ``set_tables``.

    Built on the meta device, so the real-size default table is never allocated; materialised
    and initialised like any other model (``init_weights``).
    """
    with torch.device("meta"):
        model = EngramLM(config, corpus.compressed_vocab if config.engram else None)
    for block in model.layers:
        if block.engram is not None:
            block.engram.table = DeviceTable(1, block.engram.table.dim)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def table_shapes(model: EngramLM) -> dict[int, tuple[int, int]]:
    """{layer_id: (num_rows, dim)} the Engram layers need: sum of head primes, head_dim."""
    assert model.hasher is not None
    dim = model.config.engram.head_dim  # type: ignore[union-attr]
    return {layer: (sum(m), dim) for layer, m in model.hasher.moduli.items()}


def set_tables(model: EngramLM, tables: dict[int, torch.nn.Module]) -> None:
    for block in model.layers:
        if block.engram is not None:
            block.engram.table = tables[block.layer_id]


def fill_rows(path: Path, num_rows: int, dim: int, dtype: torch.dtype, seed: int = 0) -> float:
    """Write N(0, 0.02^2) rows sequentially into a (closed) table file; -> seconds.

    Then drop the file's pages from the page cache, so the first reads come from the disk.
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    fd = os.open(path, os.O_RDWR)
    try:
        for start, stop in row_chunks(num_rows, max(1, (64 << 20) // (dim * 4))):
            values = torch.empty(stop - start, dim).normal_(std=TABLE_INIT_STD, generator=g)
            values = values.to(dtype)
            raw = values.view(torch.int16) if dtype == torch.bfloat16 else values
            view = memoryview(raw.numpy()).cast("B")
            offset = DATA_OFFSET + start * dim * itemsize
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def filled_store(
    path: Path, num_rows: int, dim: int, *, cache_bytes: int, dtype: torch.dtype = torch.float32
) -> tuple[DiskStore, float]:
    """A DiskStore whose file holds real rows (not holes); -> (store, seconds to fill)."""
    DiskStore.create(path, num_rows, dim, dtype=dtype, cache_bytes=0).close()
    seconds = fill_rows(path, num_rows, dim, dtype)
    return DiskStore.open(path, cache_bytes=cache_bytes), seconds


def sequential_read_rate(path: Path) -> float:
    """Bytes/s reading ``path`` front to back in 8 MB reads, its pages dropped first."""
    drop_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    total, t0 = 0, time.perf_counter()
    try:
        while chunk := os.read(fd, 8 << 20):
            total += len(chunk)
    finally:
        os.close(fd)
    return total / (time.perf_counter() - t0)


def rss_gb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in GB, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / GB
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def block_reads() -> int:
    """Bytes this process has made the kernel read from block devices (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / GB


def check_disk(path: Path, need_gb: float, keep_gb: float = 10.0) -> None:
    free = free_gb(path)
    if free - need_gb < keep_gb:
        raise SystemExit(
            f"{path}: {free:.1f} GB free, this needs {need_gb:.1f} GB and must leave {keep_gb} GB"
        )


# --- steps: training step time vs table size ----------------------------------------------------
class Trainee:
    """A model, its optimisers and one timed training step (the loop body of ``train``).

    With a ``warmer`` (one background thread), each step first hands it the next batch's ids to
    hash and warm the tables with, as ``train``'s data loader thread does, and the step counts
    until that is done too (the loader's next batch would not be ready before).
    """

    def __init__(
        self, model: EngramLM, cfg: TrainConfig, warmer: ThreadPoolExecutor | None = None
    ) -> None:
        self.model = model
        self.model.train()
        self.optimizers = build_optimizers(model, cfg)
        self.dense = [p for p in model.dense_parameters() if p.requires_grad]
        self.cfg = cfg
        self.warmer = warmer
        self.losses: list[float] = []

    def _warm(self, input_ids: torch.Tensor) -> None:
        self.model.warm_tables(self.model.compute_hash_ids(input_ids))

    def step(self, input_ids: torch.Tensor, targets: torch.Tensor, next_ids: torch.Tensor) -> float:
        t0 = time.perf_counter()
        warming: Future[None] | None = None
        if self.warmer is not None:
            warming = self.warmer.submit(self._warm, next_ids)
        loss = self.model(input_ids, targets=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.dense, self.cfg.grad_clip, foreach=False)
        for opt in self.optimizers.values():
            opt.step()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if warming is not None:
            warming.result()
        seconds = time.perf_counter() - t0
        self.losses.append(float(loss.detach()))
        return seconds


def disk_model(
    config: ModelConfig, corpus: PreparedCorpus, folder: Path, args: argparse.Namespace
) -> tuple[EngramLM, dict[int, OffloadedTable]]:
    """The model with its Engram tables in files under ``folder`` (weights filled, page cache
    dropped; moments holes), built the same way every time: same seed, same rows."""
    torch.manual_seed(0)
    model = meta_model(config, corpus)
    tables = {}
    for layer, (num_rows, d) in table_shapes(model).items():
        directory = folder / f"layer{layer}"
        directory.mkdir(parents=True)
        for name in ("weight", "exp_avg", "exp_avg_sq"):
            DiskStore.create(directory / f"{name}.engt", num_rows, d, cache_bytes=0).close()
        fill_rows(directory / "weight.engt", num_rows, d, torch.float32)
        tables[layer] = disk_table(
            directory, num_rows, d, cache_bytes=args.cache_mb << 20, create=False
        )
        if args.madvise == "random":
            for store in tables[layer].stores:
                store._mm._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
    set_tables(model, tables)  # type: ignore[arg-type]
    return model, tables


def cmd_steps(args: argparse.Namespace) -> None:
    corpus = prepare_corpus("pydocs", vocab_size=8192)
    backbone = backbone_config(corpus, args.layers, args.hidden, args.seq)
    cfg = TrainConfig(seq_len=args.seq, batch_size=args.batch)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    disk_rows = int(args.disk_rows)
    dim = args.hidden // 8
    disk_kinds = ["no-warm" if args.no_warm else "warm"]  # one disk model per kind, own files
    if args.compare_warm:
        disk_kinds = ["warm", "no-warm"]
    # Allocated per disk model: the filled weight file, plus a 4 KB block per moment row written.
    moment_gb = 2 * (args.steps + 1) * args.batch * args.seq * 16 * 4096 / GB
    check_disk(root, len(disk_kinds) * (disk_rows * dim * 4 / GB + moment_gb))

    # What the library path costs: disk_table(create=True) on a small table, rows/s.
    probe_rows = 1 << 20
    t0 = time.perf_counter()
    probe = disk_table(root / "probe", probe_rows, dim, cache_bytes=256 << 20)
    create_s = time.perf_counter() - t0
    for store in probe.stores:
        store.close()  # type: ignore[attr-defined]
    shutil.rmtree(root / "probe")

    trainees: dict[str, Trainee] = {}
    build_s: dict[str, float] = {}
    for rows in (1e5, 1e6, 1e7):
        config = with_engram(backbone, corpus, engram_for_rows(int(rows), args.hidden))
        torch.manual_seed(0)
        t0 = time.perf_counter()
        trainees[f"device {rows:.0e}"] = Trainee(EngramLM(config, corpus.compressed_vocab), cfg)
        build_s[f"device {rows:.0e}"] = time.perf_counter() - t0
    config = with_engram(backbone, corpus, engram_for_rows(int(1e7), args.hidden))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = EngramLM(config, corpus.compressed_vocab, tables=TablePlan("host"))
    trainees["host 1e+07"] = Trainee(model, cfg)
    build_s["host 1e+07"] = time.perf_counter() - t0

    config = with_engram(backbone, corpus, engram_for_rows(disk_rows, args.hidden))
    warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm")
    disk_tables: dict[str, dict[int, OffloadedTable]] = {}
    for kind in disk_kinds:
        t0 = time.perf_counter()
        model, disk_tables[kind] = disk_model(config, corpus, root / f"steps_{kind}", args)
        disk_name = f"disk {disk_rows:.0e}" + (" no-warm" if kind == "no-warm" else "")
        trainees[disk_name] = Trainee(model, cfg, warmer if kind == "warm" else None)
        build_s[disk_name] = time.perf_counter() - t0
    first_disk = root / f"steps_{disk_kinds[0]}" / "layer1"
    disk_files = {f.name: f.stat().st_size / GB for f in first_disk.glob("*.engt")}

    batches = TrainBatches(corpus.train, args.batch, args.seq, seed=0)
    read0 = block_reads()
    times: dict[str, list[float]] = {name: [] for name in trainees}
    batch = next(batches)
    for i in range(args.steps + 1):  # step 0 of each: warm-up
        following = next(batches)
        for name, trainee in trainees.items():
            seconds = trainee.step(batch.input_ids, batch.targets, following.input_ids)
            if i:
                times[name].append(seconds)
        batch = following
    warmer.shutdown()
    median = {name: statistics.median(t) for name, t in times.items()}
    read_gb = (block_reads() - read0) / GB

    warm_note = ""
    if "warm" in disk_kinds:
        warm_note = "; disk warm: batch i+1's rows warmed on a thread during step i, as in train"
    print(f"machine: {machine()}")
    print(
        f"train step B={args.batch} T={args.seq} D={args.hidden} layers={args.layers}, Engram at "
        f"layer 1 (H=16, dim {dim}); median of {args.steps} interleaved steps; disk cache "
        f"{args.cache_mb} MB per table, madvise {args.madvise}; disk files {disk_files} GB; "
        f"{read_gb:.1f} GB read from the block device during the timed steps{warm_note}"
    )
    base = median["device 1e+05"]
    width = max(12, *map(len, trainees))
    for name, trainee in trainees.items():
        rows = sum(t.num_rows for t in trainee.model.engram_tables())
        print(
            f"  {name:{width}s} {rows:>12,} rows {rows * dim * 4 / GB:7.2f} GB  built in "
            f"{build_s[name]:6.1f} s  {median[name] * 1e3:8.1f} ms/step  "
            f"{median[name] / base:5.2f}x of the 1e5 step"
        )
    for kind, tables in disk_tables.items():
        stats = [s.stats() for s in tables[1].stores]  # type: ignore[attr-defined]
        hit = [f"{s['hit_rate']:.1%}" for s in stats]
        warmed = sum(int(s["pages_warmed"]) for s in stats)
        print(
            f"  disk {kind}: cache hit rates (weight, exp_avg, exp_avg_sq): {hit}; "
            f"{warmed:,} pages warmed"
        )
    if len(disk_kinds) == 2:
        warm, cold = (trainees[n].losses for n in trainees if n.startswith("disk"))
        print(f"  disk warm and no-warm losses bitwise equal: {warm == cold}")
    print(
        f"  library disk_table(create=True): {probe_rows:,} x {dim} rows in {create_s:.1f} s "
        f"= {probe_rows / create_s / 1e6:.2f} M rows/s "
        f"({probe_rows * dim * 4 * 3 / create_s / GB:.2f} GB/s of the three stores); "
        f"a {disk_rows:.0e}-row table would take ~{disk_rows * create_s / probe_rows / 60:.0f} min"
    )
    for kind, tables in disk_tables.items():
        for table in tables.values():
            table.close()
        shutil.rmtree(root / f"steps_{kind}")


# --- cache: disk + hot-row cache vs in-memory on real id streams --------------------------------
def lru_hit_rate(stream: list[np.ndarray], capacity: int) -> float:
    """Plain LRU (admit every miss, evict the least recently used) on per-batch distinct ids."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for rows in stream:
        for row in rows.tolist():
            total += 1
            if row in cache:
                hits += 1
                cache.move_to_end(row)
            elif capacity:
                cache[row] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / total


def cmd_cache(args: argparse.Namespace) -> None:
    corpus = prepare_corpus("pydocs", vocab_size=8192)
    backbone = backbone_config(corpus, 2, args.hidden, args.seq)
    config = with_engram(backbone, corpus, engram_for_rows(int(args.rows), args.hidden))
    model = meta_model(config, corpus)
    num_rows, dim = table_shapes(model)[1]
    engram = model.layers[1].engram
    assert engram is not None
    val = ValBatches(corpus.val, args.batch, args.seq)
    rows_stream = [engram.global_rows(model.compute_hash_ids(b.input_ids)[1]) for b in val]
    lookups = sum(r.numel() for r in rows_stream)
    distinct = [torch.unique(r).numpy() for r in rows_stream]  # what a DiskStore reads per batch
    reads = sum(len(d) for d in distinct)
    ever_rows = np.unique(np.concatenate(distinct))
    ever = len(ever_rows)

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    table_bytes = num_rows * dim * 4
    budgets = [float(b) for b in args.budgets.split(",")]
    check_disk(root, len(budgets) * table_bytes / GB)
    torch.manual_seed(0)
    device = DeviceTable(num_rows, dim)
    memory = MemoryStore(num_rows, dim)
    memory.data.copy_(device.weight.detach())
    tables: dict[str, torch.nn.Module] = {
        "device (F.embedding)": device,
        # inference: the moments are never read, so the weight store stands in for them
        "host (MemoryStore)": OffloadedTable(memory, memory, memory),
    }
    stores = {}
    for frac in budgets:
        store, _ = filled_store(
            root / f"cache_{frac:g}.engt", num_rows, dim, cache_bytes=int(frac * table_bytes)
        )
        stores[frac] = store
        tables[f"disk, cache {frac:.0%}"] = OffloadedTable(store, store, store)

    def replay() -> dict[str, float]:  # seconds per table for one pass over the stream
        spent = {name: 0.0 for name in tables}
        with torch.no_grad():
            for rows in rows_stream:
                for name, table in tables.items():
                    t0 = time.perf_counter()
                    table.lookup(rows)  # type: ignore[operator]
                    spent[name] += time.perf_counter() - t0
        return spent

    faults0, read0 = major_faults(), block_reads()
    spent = replay()

    print(f"machine: {machine()}")
    print(
        f"pydocs validation, B={args.batch} T={args.seq}: {len(rows_stream)} batches, "
        f"{lookups:,} lookups (H=16), {reads:,} per-batch-distinct row reads, {ever:,} distinct "
        f"rows; table [{num_rows:,}, {dim}] fp32 = {table_bytes / GB:.2f} GB; one pass, each "
        f"batch looked up in every table in turn; page cache of the disk files dropped first; "
        f"{major_faults() - faults0:,} major page faults, "
        f"{(block_reads() - read0) / GB:.2f} GB read from the block device in the pass"
    )
    shares = {
        name: huge_page_share(tensor)
        for name, tensor in (("device", device.weight), ("host", memory.data))
    }
    print(
        "  in-memory tables backed by huge pages: "
        + ", ".join(
            f"{name} {'?' if share is None else f'{share:.0%}'}" for name, share in shares.items()
        )
        + " (tables/hugepages.py: advised, granted only where the kernel has free 2 MB blocks)"
    )
    ceiling = 1 - ever / reads
    print(f"  hit-rate ceiling of any cache on this stream (1 - first uses / reads): {ceiling:.1%}")
    ref = spent["device (F.embedding)"]
    # The bound on any disk tier here: every page holding a row the stream uses must come from
    # the disk once; read at the device's sequential rate (its best), they alone take this long.
    row_bytes = dim * 4
    pages = np.unique(
        np.concatenate(
            [
                (DATA_OFFSET + ever_rows * row_bytes) // mmap.PAGESIZE,
                (DATA_OFFSET + (ever_rows + 1) * row_bytes - 1) // mmap.PAGESIZE,
            ]
        )
    )
    needed = len(pages) * mmap.PAGESIZE
    rate = sequential_read_rate(root / f"cache_{budgets[-1]:g}.engt")
    print(
        f"  compulsory reads: {len(pages):,} distinct pages ({needed / GB:.2f} GB) hold the rows "
        f"used; at this disk's sequential read rate ({rate / 1e6:.0f} MB/s, measured now) they "
        f"take {needed / rate:.2f} s, so no disk tier can exceed {ref / (needed / rate):.2f}x "
        "of device on this pass from a cold page cache"
    )
    results = []
    for name, sec in spent.items():
        line = f"  {name:22s} {lookups / sec / 1e6:7.2f} M lookups/s  {ref / sec:5.2f}x of device"
        frac = next((f for f in budgets if name == f"disk, cache {f:.0%}"), None)
        if frac:  # the row cache's hit rate (none without one)
            store = stores[frac]
            tinylfu = store.stats()["hit_rate"]
            lru = lru_hit_rate(distinct, store.capacity)
            results.append((frac, tinylfu, lru))
            line += (
                f"  {store.capacity:>9,} rows cached  hit rate TinyLFU {tinylfu:6.1%}  "
                f"LRU {lru:6.1%}"
            )
        print(line)
    # Pass 2: the files' pages are now in the page cache and the row caches hold what pass 1
    # left: what the tier costs in software when nothing is read from the device.
    before = {frac: store.stats() for frac, store in stores.items()}
    faults0, read0 = major_faults(), block_reads()
    again = replay()
    print(
        f"second pass, the disk files in the page cache: {major_faults() - faults0:,} major "
        f"page faults, {(block_reads() - read0) / GB:.2f} GB read from the block device"
    )
    ref = again["device (F.embedding)"]
    for name, sec in again.items():
        line = f"  {name:22s} {lookups / sec / 1e6:7.2f} M lookups/s  {ref / sec:5.2f}x of device"
        frac = next((f for f in budgets if name == f"disk, cache {f:.0%}"), None)
        if frac:
            now, was = stores[frac].stats(), before[frac]
            hits = now["hits"] - was["hits"]
            line += f"  row-cache hit rate {hits / (hits + now['misses'] - was['misses']):6.1%}"
        print(line)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [100 * f for f, _, _ in results]
    ax.plot(x, [100 * h for _, h, _ in results], "o-", label="TinyLFU (DiskStore)")
    ax.plot(x, [100 * h for _, _, h in results], "s--", label="LRU (simulated)")
    ax.axhline(100 * ceiling, color="gray", lw=0.8, ls=":", label="ceiling (first uses miss)")
    ax.set_xscale("log")
    ax.set_xlabel("cache budget, % of table bytes")
    ax.set_ylabel("hit rate, % of row reads")
    ax.set_title(f"pydocs val hash ids, {num_rows / 1e6:.0f}M-row table", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.plot)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"  plot: {out}")
    for frac, store in stores.items():
        store.close()
        (root / f"cache_{frac:g}.engt").unlink()
        (root / f"cache_{frac:g}.engt.journal").unlink()


# --- gather: random-row index_select vs a contiguous copy --------------------------------------
def cmd_gather(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    print(
        f"gather {args.rows:,} random rows (index_select into a preallocated buffer) from: a "
        f"{args.table_gb:g} GB fp32 table in 4 KB pages (plain torch.randn); the same size as "
        "engramlm allocates it (DeviceTable: huge pages, tables/hugepages.py); a 16 MB table "
        "(fits the last-level cache: no DRAM miss per row). memcpy: copy_ of a contiguous "
        f"buffer of the same bytes. GB/s of rows delivered, medians of {args.repeats} "
        "interleaved calls"
    )
    for dim in (int(d) for d in args.dims.split(",")):
        num_rows = int(args.table_gb * GB) // (dim * 4)
        small = torch.randn((16 << 20) // (dim * 4), dim)
        plain = torch.randn(num_rows, dim)
        huge = DeviceTable(num_rows, dim).weight.detach()
        idx = torch.randint(0, num_rows, (args.rows,))
        idx_small = torch.randint(0, len(small), (args.rows,))
        out = torch.empty(args.rows, dim)
        src = plain[: args.rows].clone()
        dst = torch.empty_like(src)
        t = interleaved(
            {
                "4 KB pages": lambda i=idx, o=out, t=plain: torch.index_select(t, 0, i, out=o),
                "huge pages": lambda i=idx, o=out, t=huge: torch.index_select(t, 0, i, out=o),
                "16 MB table": lambda i=idx_small, o=out, t=small: torch.index_select(
                    t, 0, i, out=o
                ),
                "memcpy": lambda d=dst, s=src: d.copy_(s),
            },
            repeats=args.repeats,
        )
        nbytes = args.rows * dim * 4
        cells = ", ".join(
            f"{name} {nbytes / sec / GB:5.2f} GB/s ({t['memcpy'] / sec:.2f}x)"
            for name, sec in t.items()
        )
        print(f"  dim {dim:4d} ({dim * 4:4d} B rows): {cells}")
        del plain, huge


def cmd_reads(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    num_rows = int(args.table_gb * GB) // (args.dim * 4)
    store, _ = filled_store(root / "reads.engt", num_rows, args.dim, cache_bytes=0)
    pool_min = 8  # rows per reader of the pool path (the fp8 serving setting it had)
    readers = ThreadPoolExecutor(max_workers=64)  # started once, as the store's pool was

    def pool(rows: np.ndarray) -> None:
        bounds = np.linspace(0, len(rows), min(64, max(1, len(rows) // pool_min)) + 1)
        spans = zip(bounds[:-1].astype(int), bounds[1:].astype(int), strict=True)
        list(readers.map(lambda span: store._mm[rows[span[0] : span[1]]], spans))

    def advised(rows: np.ndarray) -> None:
        store._advise_willneed(rows)
        store._mm[rows]

    ways: dict[str, Callable[[np.ndarray], object]] = {
        "advised + one gather (DiskStore's)": advised,
        "reader pool (before)": pool,
        "page faults in turn": lambda rows: store._mm[rows],
    }
    print(
        f"{args.table_gb:g} GB fp32 file of {args.dim}-value rows; n random cold rows (page "
        f"cache dropped before each read); medians of {args.repeats} reads, ways interleaved"
    )
    rng = np.random.default_rng(0)
    try:
        for n in (int(x) for x in args.counts.split(",")):
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(args.repeats):
                for name, way in ways.items():
                    rows = np.unique(rng.integers(0, num_rows, n))
                    drop_page_cache(store.path)
                    t0 = time.perf_counter()
                    way(rows)
                    times[name].append(time.perf_counter() - t0)
            cells = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in times.items())
            print(f"  {n:5d} rows: {cells}")
    finally:
        readers.shutdown()
        store.close()
        shutil.rmtree(root, ignore_errors=True)


# --- prefetch: host-pinned + prefetch vs on-device (CUDA) --------------------------------------
def cmd_prefetch(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    if not torch.cuda.is_available():
        print("  skipped: needs CUDA (host-pinned rows copied to a GPU); none on this machine")
        return
    device = torch.device("cuda")
    print(f"  device: {torch.cuda.get_device_name(device)}")
    corpus = prepare_corpus("pydocs", vocab_size=8192)
    backbone = backbone_config(corpus, args.layers, args.hidden, args.seq)
    config = with_engram(backbone, corpus, engram_for_rows(int(args.rows), args.hidden))
    models = {}
    for kind in ("device", "host"):
        torch.manual_seed(0)
        model = EngramLM(config, corpus.compressed_vocab, tables=TablePlan(kind)).to(device)
        models[kind] = model.eval()
    val = ValBatches(corpus.val, args.batch, args.seq, max_batches=args.batches)
    inputs = [b.input_ids.to(device) for b in val]

    def run(model: EngramLM) -> Callable[[], None]:
        def forward_all() -> None:
            with torch.no_grad():
                for ids in inputs:
                    model(ids)
            torch.cuda.synchronize(device)

        return forward_all

    t = interleaved({kind: run(m) for kind, m in models.items()}, repeats=args.repeats)
    tokens = sum(ids.numel() for ids in inputs)
    print(
        f"  forward, B={args.batch} T={args.seq}, {len(inputs)} val batches per call, "
        f"table {int(args.rows):,} rows; medians of {args.repeats} interleaved calls"
    )
    for kind, sec in t.items():
        print(f"  {kind:7s} {tokens / sec:12,.0f} tok/s")
    print(f"  host-pinned+prefetch / device tokens/s: {t['device'] / t['host']:.3f}")


# --- inference: the Engram-27B table size from disk --------------------------------------------
def cmd_inference(args: argparse.Namespace) -> None:
    corpus = prepare_corpus("pydocs", vocab_size=8192)
    backbone = backbone_config(corpus, args.layers, args.hidden, args.seq)
    engram_cfg = EngramConfig.preset("engram-27b", layer_ids=(1, args.layers - 1), hc_mult=1)
    config = with_engram(backbone, corpus, engram_cfg)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = meta_model(config, corpus).eval()
    shapes = table_shapes(model)
    total_bytes = sum(r * d * itemsize for r, d in shapes.values())
    check_disk(root, total_bytes / GB)
    tables, stores, fill_s = {}, {}, 0.0
    for layer, (num_rows, dim) in shapes.items():
        store, seconds = filled_store(
            root / f"engram27b_layer{layer}.engt",
            num_rows,
            dim,
            cache_bytes=args.cache_mb << 20,
            dtype=dtype,
        )
        fill_s += seconds
        stores[layer] = store
        if args.madvise == "random":  # reach into the store's memory map: no 8 MB read-around
            store._mm._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
        tables[layer] = OffloadedTable(store, store, store)  # inference: no moments
    set_tables(model, tables)
    torch.manual_seed(0)
    dense = EngramLM(backbone).eval()

    mem_total = 0.0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_total = int(line.split()[1]) * 1024 / GB
    val = ValBatches(corpus.val, args.batch, args.seq, max_batches=args.batches + 1)
    batches = [b.input_ids for b in val]
    spent = {"backbone": 0.0, "engram-27b tables on disk": 0.0}
    first: dict[str, float] = {}
    faults0, read0 = major_faults(), block_reads()
    with torch.no_grad():
        for i, ids in enumerate(batches):
            for name, m in (("backbone", dense), ("engram-27b tables on disk", model)):
                t0 = time.perf_counter()
                m(ids)
                sec = time.perf_counter() - t0
                if i:
                    spent[name] += sec
                else:
                    first[name] = sec
    faults = major_faults() - faults0
    read_gb = (block_reads() - read0) / GB
    rss, hwm = rss_gb()
    tokens = sum(ids.numel() for ids in batches[1:])
    engram_params = sum(r * d for r, d in shapes.values())

    print(f"machine: {machine()}, {mem_total:.1f} GB RAM")
    print(
        f"inference forward, B={args.batch} T={args.seq}, {args.batches} pydocs val batches "
        f"(after one warm-up batch), backbone {args.layers} layers D={args.hidden}; Engram-27B "
        f"tables at layers {engram_cfg.layer_ids}: {engram_params / 1e9:.2f}B params, "
        f"{total_bytes / GB:.1f} GB {args.dtype} in files filled with real rows in {fill_s:.0f} s "
        f"({total_bytes / fill_s / GB:.2f} GB/s), page cache dropped after filling; row cache "
        f"{args.cache_mb} MB per table; madvise {args.madvise}; the two models interleaved batch "
        "by batch"
    )
    for name, sec in spent.items():
        print(f"  {name:26s} {tokens / sec:9,.0f} tok/s  (first batch {first[name] * 1e3:7.0f} ms)")
    ratio = spent["backbone"] / spent["engram-27b tables on disk"]
    print(f"  engram/backbone tokens/s: {ratio:.3f}")
    hits = [f"{s.stats()['hit_rate']:.1%}" for s in stores.values()]
    print(
        f"  row-cache hit rates {hits}; {faults:,} major page faults, {read_gb:.2f} GB read from "
        f"the block device (warm-up batch included); process RSS {rss:.2f} GB (peak "
        f"{hwm:.2f} GB) against {total_bytes / GB:.1f} GB of tables"
    )
    for layer, store in stores.items():
        store.close()
        (root / f"engram27b_layer{layer}.engt").unlink()
        (root / f"engram27b_layer{layer}.engt.journal").unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/engramlm-tiers", help="folder for the big table files")
    p.add_argument("--threads", type=int, default=None)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("steps", help="training step time vs table size and tier")
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--hidden", type=int, default=256)
    s.add_argument("--seq", type=int, default=128)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--disk-rows", type=float, default=1e8)
    s.add_argument("--cache-mb", type=int, default=256, help="disk tier row cache per table")
    s.add_argument(
        "--madvise",
        choices=("normal", "random"),
        default="random",
        help="access hint on the disk tables' memory maps; DiskStore itself leaves it normal, "
        "which reads ahead read_ahead_kb around every faulted row",
    )
    s.add_argument(
        "--no-warm",
        action="store_true",
        help="the disk model without warm_tables on the next batch (train's loader warms)",
    )
    s.add_argument(
        "--compare-warm",
        action="store_true",
        help="two disk models, one warmed and one not, each with its own files, interleaved",
    )
    s.set_defaults(fn=cmd_steps)

    s = sub.add_parser("cache", help="disk tier + hot-row cache vs in-memory on real ids")
    s.add_argument("--rows", type=float, default=1e7)
    s.add_argument("--hidden", type=int, default=256)
    s.add_argument("--seq", type=int, default=128)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument(
        "--budgets",
        default="0,0.01,0.05,0.2,0.5",
        help="row cache sizes, fractions of table bytes (0: no row cache, the page cache only)",
    )
    s.add_argument("--plot", default="docs/img/tiers_hit_rate.png")
    s.set_defaults(fn=cmd_cache)

    s = sub.add_parser("gather", help="random-row gather vs memcpy bandwidth")
    s.add_argument("--table-gb", type=float, default=4.0)
    s.add_argument("--rows", type=int, default=1 << 20)
    s.add_argument("--dims", default="32,80,256")
    s.add_argument("--repeats", type=int, default=7)
    s.set_defaults(fn=cmd_gather)

    s = sub.add_parser("reads", help="cold row reads: advised + gather vs reader pool vs faults")
    s.add_argument("--dir", default="/tmp/engramlm-tiers")
    s.add_argument("--table-gb", type=float, default=1.0)
    s.add_argument("--dim", type=int, default=64)
    s.add_argument("--counts", default="30,90,500,2000")
    s.add_argument("--repeats", type=int, default=15)
    s.set_defaults(fn=cmd_reads)

    s = sub.add_parser("prefetch", help="(CUDA) host-pinned + prefetch vs on-device table")
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--hidden", type=int, default=1024)
    s.add_argument("--seq", type=int, default=512)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--rows", type=float, default=1e7)
    s.add_argument("--batches", type=int, default=8)
    s.add_argument("--repeats", type=int, default=5)
    s.set_defaults(fn=cmd_prefetch)

    s = sub.add_parser("inference", help="Engram-27B-sized tables on disk, forward tokens/s")
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--hidden", type=int, default=512)
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--batches", type=int, default=20)
    s.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    s.add_argument("--cache-mb", type=int, default=1024, help="row cache per table")
    s.add_argument(
        "--madvise",
        choices=("normal", "random"),
        default="normal",
        help="access hint on the table files' memory maps (DiskStore uses the default, normal)",
    )
    s.set_defaults(fn=cmd_inference)

    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.fn(args)


if __name__ == "__main__":
    main()
