"""Every table backend behaves like the in-memory one (STYLE.md "The seams", SPEC §5).

The shared suite is parametrised over backends (device, host, disk when
``engramlm.tables.disk`` is there): lookups, prefetching (including prefetches for two
batches in flight at once, and prefetches overtaken by a write), warming, and training - one
step of a table, a tiny EngramLM, and full ``train()`` runs (with and without warming) -
bitwise equal (fp32) to the device table trained with SparseAdam. Then conversion between
backends, checkpoints that move between them, and exact resume of every tier (disk tables
through the snapshots in checkpoints), also onto another tier (Adam moments included), and
``engramlm tables export|import``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_pages, stdlib_page
from engramlm.checkpoint import CheckpointError, checkpoint_dir, verify_checkpoint
from engramlm.cli import main
from engramlm.config import EngramConfig, ModelConfig
from engramlm.data import PreparedCorpus, prepare_corpus
from engramlm.model import EngramLM
from engramlm.tables import (
    DeviceTable,
    MemoryStore,
    OffloadedTable,
    Table,
    TableAdam,
    TablePlan,
    build_table,
    convert_table,
)
from engramlm.tables import offload as offload_module
from engramlm.tables.base import TABLE_INIT_STD
from engramlm.tables.plan import read_rows
from engramlm.train import TrainConfig, build_optimizers, evaluate_run, load_run, train

NUM_ROWS, DIM = 97, 8


def disk_available() -> bool:
    try:
        from engramlm.tables.disk import disk_table  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=["device", "host", "disk"])
def plan(request: pytest.FixtureRequest, tmp_path: Path) -> TablePlan:
    if request.param == "disk":
        if not disk_available():
            pytest.skip("disk tier not available")
        return TablePlan("disk", path=str(tmp_path / "tables"), cache_mb=1)
    return TablePlan(request.param)


@pytest.fixture
def reference() -> DeviceTable:
    """The rows every backend must reproduce."""
    return DeviceTable(NUM_ROWS, DIM)


def copy_of(reference: DeviceTable, plan: TablePlan, name: str = "t") -> Table:
    table = build_table(plan, NUM_ROWS, DIM, name=name)
    convert_table(reference, table, chunk_rows=10)  # 97 rows: a short last chunk
    return table


def table_optimizer(table: Table) -> torch.optim.Optimizer | TableAdam:
    """Lazy Adam as training builds it: SparseAdam for device tables, else TableAdam."""
    if isinstance(table, DeviceTable):
        table.sparse_grad = True
        return torch.optim.SparseAdam(table.parameters(), lr=0.1, betas=(0.9, 0.95))
    assert isinstance(table, OffloadedTable)
    return TableAdam([table], lr=0.1, betas=(0.9, 0.95))


def all_rows(table: Table) -> torch.Tensor:
    return read_rows(table, torch.arange(table.num_rows))


def random_rows(seed: int, shape: tuple[int, ...] = (2, 5, 3)) -> torch.Tensor:
    return torch.randint(0, NUM_ROWS, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Lookup and prefetch


def test_lookup_returns_the_addressed_rows(plan: TablePlan, reference: DeviceTable) -> None:
    table, rows = copy_of(reference, plan), random_rows(0)
    assert torch.equal(table.lookup(rows), reference.weight.detach()[rows])


def test_prefetch_then_lookup_equals_plain_lookup(plan: TablePlan, reference: DeviceTable) -> None:
    table, rows = copy_of(reference, plan), random_rows(1)
    table.prefetch(rows)
    assert torch.equal(table.lookup(rows), reference.weight.detach()[rows])


def test_warm_then_lookup_equals_plain_lookup(plan: TablePlan, reference: DeviceTable) -> None:
    table, rows = copy_of(reference, plan), random_rows(5)
    table.warm(rows)
    assert torch.equal(table.lookup(rows), reference.weight.detach()[rows])


def test_two_prefetches_in_flight_each_get_their_own_rows(
    plan: TablePlan, reference: DeviceTable
) -> None:
    table = copy_of(reference, plan)
    a, b = random_rows(2), random_rows(3)  # same shape, different rows
    assert not torch.equal(a, b)
    table.prefetch(a)
    table.prefetch(b)
    got_b, got_a = table.lookup(b), table.lookup(a)
    assert torch.equal(got_a, reference.weight.detach()[a])
    assert torch.equal(got_b, reference.weight.detach()[b])


def test_prefetch_is_never_handed_to_a_lookup_of_other_rows(
    plan: TablePlan, reference: DeviceTable
) -> None:
    table = copy_of(reference, plan)
    a, b = random_rows(4), random_rows(5)
    table.prefetch(a)
    assert torch.equal(table.lookup(b), reference.weight.detach()[b])


def test_prefetch_issued_before_an_optimizer_step_is_not_used_after_it(
    plan: TablePlan, reference: DeviceTable
) -> None:
    table, rows = copy_of(reference, plan), random_rows(6)
    optimizer = table_optimizer(table)
    table.lookup(rows).pow(2).sum().backward()
    table.prefetch(rows)  # gathers the rows as they are before the step
    optimizer.step()
    after = table.lookup(rows).detach()
    assert torch.equal(after, all_rows(table)[rows])
    assert not torch.equal(after, reference.weight.detach()[rows])


def test_unclaimed_prefetches_are_bounded() -> None:
    table = build_table(TablePlan("host"), NUM_ROWS, DIM, name="t")
    assert isinstance(table, OffloadedTable)
    for seed in range(3 * table.max_prefetches):
        table.prefetch(random_rows(seed))
    assert table.num_prefetched == table.max_prefetches


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefetches_copy_on_a_side_stream_and_deliver_their_own_rows(
    reference: DeviceTable,
) -> None:
    table = copy_of(reference, TablePlan("host"))
    assert isinstance(table, OffloadedTable)
    a, b = random_rows(7).cuda(), random_rows(8).cuda()
    table.prefetch(a)
    table.prefetch(b)
    got_b, got_a = table.lookup(b), table.lookup(a)
    expected = reference.weight.detach().cuda()
    assert got_a.is_cuda and torch.equal(got_a, expected[a]) and torch.equal(got_b, expected[b])
    assert (table.prefetch_hits, table.prefetch_misses) == (2, 0)


# ---------------------------------------------------------------------------------------------
# Training: bitwise equal to the device table with SparseAdam


def test_optimizer_steps_match_the_device_table_and_touch_only_addressed_rows(
    plan: TablePlan, reference: DeviceTable
) -> None:
    table = copy_of(reference, plan)
    twin = copy_of(reference, TablePlan("device"))
    optimizers = [table_optimizer(table), table_optimizer(twin)]
    addressed = torch.zeros(NUM_ROWS, dtype=torch.bool)
    for step in range(3):
        rows = random_rows(10 + step)  # with repeated rows within and across batches
        addressed[rows.flatten()] = True
        weights = torch.randn(*rows.shape, DIM)
        for t, opt in zip((table, twin), optimizers, strict=True):
            t.prefetch(rows)
            (t.lookup(rows) * weights).sum().backward()
            opt.step()
            opt.zero_grad()
    after = all_rows(table)
    assert torch.equal(after, all_rows(twin))
    changed = (after != reference.weight.detach()).any(dim=1)
    assert torch.equal(changed, addressed)


def tiny_config(layer_ids: tuple[int, ...] = (1,)) -> ModelConfig:
    engram = EngramConfig.preset("tiny", layer_ids=layer_ids)
    return ModelConfig.preset("tiny-engram", max_seq_len=32, engram=engram)


def test_tiny_engramlm_trains_bitwise_like_the_device_model(plan: TablePlan) -> None:
    config = tiny_config(layer_ids=(0, 2))
    device_model = EngramLM(config)
    model = EngramLM(config, tables=plan)
    model.load_state_dict(device_model.state_dict())  # identical initial weights
    runs = [(m, build_optimizers(m, TrainConfig(lr=1e-2))) for m in (model, device_model)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=generator)
        losses = []
        for m, optimizers in runs:
            loss = m(ids, targets=ids).loss
            loss.backward()
            for opt in optimizers.values():
                opt.step()
                opt.zero_grad()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
    for table, twin in zip(model.engram_tables(), device_model.engram_tables(), strict=True):
        assert torch.equal(all_rows(table), all_rows(twin))


def test_forward_prefetches_every_engram_layer_before_layer_0() -> None:
    model = EngramLM(tiny_config(layer_ids=(0, 2)), tables=TablePlan("host"))
    tables = model.engram_tables()
    pending_at_layer_0: list[int] = []
    model.layers[0].register_forward_pre_hook(
        lambda *_: pending_at_layer_0.extend(t.num_prefetched for t in tables)
    )
    model(torch.randint(0, model.config.vocab_size, (2, 16)))
    assert pending_at_layer_0 == [1, 1]
    assert [(t.prefetch_hits, t.prefetch_misses) for t in tables] == [(1, 0), (1, 0)]


def test_table_initialises_like_the_device_table(
    plan: TablePlan, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offload_module, "CHUNK_ROWS", 48)  # several chunks, a short last one
    torch.manual_seed(0)
    device = DeviceTable(NUM_ROWS, DIM)
    torch.manual_seed(0)
    table = build_table(plan, NUM_ROWS, DIM, name="t")
    assert torch.equal(all_rows(table), device.weight.detach())


def test_model_initialises_like_the_device_model(plan: TablePlan) -> None:
    torch.manual_seed(0)
    device_model = EngramLM(tiny_config(layer_ids=(0, 2)))
    torch.manual_seed(0)
    model = EngramLM(tiny_config(layer_ids=(0, 2)), tables=plan)
    want = device_model.state_dict()
    got = model.state_dict()  # offloaded tables' rows are not in it (disk) or are (host)
    assert all(torch.equal(got[k], want[k]) for k in got)
    for table, twin in zip(model.engram_tables(), device_model.engram_tables(), strict=True):
        assert torch.equal(all_rows(table), all_rows(twin))


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_model_writes_each_offloaded_table_once(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = TablePlan(kind, path=str(tmp_path) if kind == "disk" else None)  # type: ignore[arg-type]
    calls: list[int] = []
    original = OffloadedTable.reset_parameters

    def counting(self: OffloadedTable, *args: object, **kwargs: object) -> None:
        calls.append(id(self))
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(OffloadedTable, "reset_parameters", counting)
    model = EngramLM(tiny_config(layer_ids=(0, 2)), tables=plan)
    assert sorted(calls) == sorted(id(t) for t in model.engram_tables())


def test_close_is_idempotent_and_leaves_disk_files_verifiable(tmp_path: Path) -> None:
    if not disk_available():
        pytest.skip("disk tier not available")
    from engramlm.tables.disk import DiskStore

    table = build_table(TablePlan("disk", path=str(tmp_path), cache_mb=1), NUM_ROWS, DIM, name="t")
    assert isinstance(table, OffloadedTable)
    table.write_rows(torch.arange(3), torch.ones(3, DIM))
    table.close()
    table.close()
    for name in ("weight", "exp_avg", "exp_avg_sq"):  # unlocked, with a valid data checksum
        with DiskStore.open(tmp_path / "t" / f"{name}.engt", verify=True) as store:
            assert store.verify()


# ---------------------------------------------------------------------------------------------
# Conversion and checkpoints across backends


def test_convert_table_round_trips_through_every_backend(
    plan: TablePlan, reference: DeviceTable
) -> None:
    middle = copy_of(reference, plan)
    back = DeviceTable(NUM_ROWS, DIM)
    convert_table(middle, back, chunk_rows=7)
    assert torch.equal(back.weight, reference.weight)


def test_convert_table_refuses_a_different_shape(reference: DeviceTable) -> None:
    with pytest.raises(ValueError, match=r"source table is \[97, 8\], destination \[96, 8\]"):
        convert_table(reference, DeviceTable(NUM_ROWS - 1, DIM))


def test_memory_store_refuses_a_misaligned_moment_store() -> None:
    with pytest.raises(ValueError, match="row-aligned"):
        OffloadedTable(MemoryStore(4, 2), MemoryStore(4, 2), MemoryStore(5, 2))


@pytest.mark.parametrize(
    ("fields", "named"),
    [({"kind": "ssd"}, "kind"), ({"kind": "disk"}, "path"), ({"cache_mb": -1}, "cache_mb")],
)
def test_invalid_table_plan_is_a_value_error_naming_the_field(
    fields: dict[str, object], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        TablePlan(**fields)  # type: ignore[arg-type]


def test_invalid_table_storage_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="table_storage"):
        TrainConfig(table_storage="ssd")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# train(): host tables train and resume bitwise like device tables

PAGES = ("json", "functools", "enum", "dataclasses", "contextlib")
STEPS, CKPT_EVERY = 12, 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> PreparedCorpus:
    folder = copy_pages(PAGES, tmp_path_factory.mktemp("tables-corpus"))
    return prepare_corpus(str(folder), vocab_size=512, cache_dir=folder / "cache")


def run_config(corpus: PreparedCorpus, out_dir: Path, storage: str) -> TrainConfig:
    return TrainConfig(
        data="unused: the corpus is passed in",
        vocab_size=512,
        seq_len=32,
        batch_size=4,
        steps=STEPS,
        warmup_steps=2,
        eval_every=0,
        eval_batches=2,
        ckpt_every=CKPT_EVERY,
        log_every=1,
        out_dir=str(out_dir),
        table_storage=storage,  # type: ignore[arg-type]
    )


STORAGES = ("device", "host", "disk")


@pytest.fixture(scope="module")
def runs(corpus: PreparedCorpus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run with device, host and disk tables."""
    root = tmp_path_factory.mktemp("runs")
    for storage in STORAGES:
        cfg = run_config(corpus, root / storage, storage)
        train(tiny_config(), cfg, corpus=corpus, progress=False)
    return {storage: root / storage for storage in STORAGES}


def losses(run: Path) -> list[tuple[int, float]]:
    rows = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, rows)]


def checkpoint_tensors(run: Path, file: str) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dir(run, STEPS) / file)


TABLE = "layers.1.engram.table"  # tiny_config's Engram layer, as a module name


def table_state(run: Path, step: int = STEPS, table: str = TABLE, index: int = 0) -> dict[str, Any]:
    """Weights, Adam moments and Adam step of an Engram table in a checkpoint, whatever its tier;
    ``index`` is the table's place in layer order, which indexes the ``tables`` optimiser."""
    ckpt = checkpoint_dir(run, step)
    saved = json.loads((ckpt / "optimizer.json").read_text())["optimizers"]["tables"]["state"]
    out: dict[str, Any] = {"step": dict((i, e) for i, e in saved)[index]["step"]}
    snapshot = ckpt / "tables" / table
    if snapshot.is_dir():  # disk: a header (rows, dim at bytes 16..32), float32 rows at 4096
        assert f"{table}.weight" not in load_file(ckpt / "model.safetensors")
        for name in ("weight", "exp_avg", "exp_avg_sq"):
            file = snapshot / f"{name}.engt"
            num_rows, dim = np.fromfile(file, dtype="<u8", count=2, offset=16)
            raw = np.fromfile(file, dtype="<f4", offset=4096)
            out[name] = torch.from_numpy(raw).view(int(num_rows), int(dim))
        return out
    model = load_file(ckpt / "model.safetensors")
    opt = load_file(ckpt / "optimizer.safetensors")
    return {
        **out,
        "weight": model[f"{table}.weight"],
        "exp_avg": opt[f"opt.tables.state.{index}.exp_avg"],
        "exp_avg_sq": opt[f"opt.tables.state.{index}.exp_avg_sq"],
    }


def is_table(key: str) -> bool:
    return ".engram.table." in key or key.startswith("opt.tables.state.")


def dense_tensors(run: Path, file: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors other than the Engram tables' (which are tier-specific)."""
    tensors = load_file(checkpoint_dir(run, step) / file)
    return {k: v for k, v in tensors.items() if not is_table(k)}


def assert_same_state(
    run: Path, reference: Path, step: int = STEPS, tables: tuple[str, ...] = (TABLE,)
) -> None:
    for file in ("model.safetensors", "optimizer.safetensors"):
        got, want = dense_tensors(run, file, step), dense_tensors(reference, file, step)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for index, table in enumerate(tables):
        got, want = table_state(run, step, table, index), table_state(reference, step, table, index)
        assert got["step"] == want["step"] > 0
        for name in ("weight", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[name], want[name]), f"{table} {name}"


@pytest.mark.parametrize("storage", ["host", "disk"])
def test_offloaded_tables_train_bitwise_like_device_tables(
    runs: dict[str, Path], storage: str
) -> None:
    saved = json.loads((runs[storage] / "config.json").read_text())["train"]
    assert saved["table_storage"] == storage
    assert losses(runs[storage]) == losses(runs["device"])
    assert_same_state(runs[storage], runs["device"])


def test_warming_disk_tables_ahead_changes_no_result(
    corpus: PreparedCorpus, runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``runs["disk"]`` warmed its tables from the loader's thread; the same run with the hint
    reaching no table trains bitwise alike (losses, weights, Adam moments)."""
    callers: list[str] = []
    monkeypatch.setattr(
        EngramLM, "warm_tables", lambda self, ids: callers.append(threading.current_thread().name)
    )
    run = tmp_path / "unwarmed"
    train(tiny_config(), run_config(corpus, run, "disk"), corpus=corpus, progress=False)
    assert callers and set(callers) == {"engramlm-prefetch"}  # what was skipped: the loader's
    assert losses(run) == losses(runs["disk"])
    assert_same_state(run, runs["disk"])


@pytest.mark.parametrize("storage", ["host", "disk"])
def test_offloaded_tables_resume_bitwise(
    corpus: PreparedCorpus,
    runs: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    storage: str,
) -> None:
    run = tmp_path / storage
    shutil.copytree(runs[storage], run)  # disk: live tables at step STEPS, past the checkpoint
    shutil.rmtree(checkpoint_dir(run, STEPS))  # as if killed between the two checkpoints
    cfg = run_config(corpus, run, storage)
    with caplog.at_level(logging.INFO, logger="engramlm.train"):
        train(tiny_config(), cfg, resume=True, corpus=corpus, progress=False)
    assert f"at step {CKPT_EVERY}" in caplog.text
    assert losses(run) == losses(runs[storage])
    assert_same_state(run, runs[storage])


# Switching tiers at a checkpoint: weights, Adam moments and Adam steps carry over

SWITCH_STEPS, SWITCH_AT = 5, 3
TWO_TABLES = ("layers.0.engram.table", "layers.2.engram.table")


def switch_config(corpus: PreparedCorpus, out_dir: Path, storage: str) -> TrainConfig:
    cfg = run_config(corpus, out_dir, storage)
    return dataclasses.replace(cfg, steps=SWITCH_STEPS, ckpt_every=SWITCH_AT)


@pytest.fixture(scope="module")
def switch_runs(
    corpus: PreparedCorpus, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """5 steps on each tier with two Engram tables; checkpoints at steps 3 and 5."""
    root = tmp_path_factory.mktemp("switch")
    for storage in STORAGES:
        cfg = switch_config(corpus, root / storage, storage)
        train(tiny_config((0, 2)), cfg, corpus=corpus, progress=False)
    return {storage: root / storage for storage in STORAGES}


@pytest.mark.parametrize(
    ("trained", "resumed"), [(a, b) for a in STORAGES for b in STORAGES if a != b]
)
def test_resuming_on_another_tier_continues_bitwise(
    corpus: PreparedCorpus,
    switch_runs: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    trained: str,
    resumed: str,
) -> None:
    """3 steps on one tier, checkpoint, 2 more on another == 5 steps on the first (fp32)."""
    run = tmp_path / "run"
    shutil.copytree(switch_runs[trained], run)
    shutil.rmtree(checkpoint_dir(run, SWITCH_STEPS))
    with caplog.at_level(logging.INFO, logger="engramlm.train"):
        train(
            tiny_config((0, 2)),
            switch_config(corpus, run, resumed),
            resume=True,
            corpus=corpus,
            progress=False,
        )
    assert f"at step {SWITCH_AT}" in caplog.text
    assert losses(run) == losses(switch_runs[trained])
    assert_same_state(run, switch_runs[trained], SWITCH_STEPS, TWO_TABLES)


def flip_a_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    os.truncate(file, file.stat().st_size - 8)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [(flip_a_bit, "data checksum mismatch"), (truncate, "size mismatch, truncated")],
)
def test_damaged_table_snapshot_is_refused_naming_it_and_resume_falls_back(
    corpus: PreparedCorpus,
    runs: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Any,
    problem: str,
) -> None:
    run = tmp_path / "disk"
    shutil.copytree(runs["disk"], run)
    damage(checkpoint_dir(run, STEPS) / "tables" / TABLE / "exp_avg.engt")
    with pytest.raises(CheckpointError, match=rf"{TABLE}/exp_avg\.engt: {problem}"):
        verify_checkpoint(checkpoint_dir(run, STEPS))
    with caplog.at_level(logging.INFO, logger="engramlm.train"):
        train(tiny_config(), run_config(corpus, run, "disk"), resume=True, corpus=corpus)
    assert f"resumed from {checkpoint_dir(run, CKPT_EVERY)} at step {CKPT_EVERY}" in caplog.text
    assert losses(run) == losses(runs["disk"])
    assert_same_state(run, runs["disk"])


def test_train_leaves_live_disk_tables_closed_and_verifiable(runs: dict[str, Path]) -> None:
    from engramlm.tables.disk import DiskStore

    for name in ("weight", "exp_avg", "exp_avg_sq"):
        path = runs["disk"] / "tables" / "engram_layer1" / f"{name}.engt"
        with DiskStore.open(path, verify=True) as store:
            assert store.verify()


@pytest.mark.parametrize(
    ("trained", "served"),
    [(t, s) for t in STORAGES for s in STORAGES if t != s],
)
def test_checkpoint_serves_identical_logits_from_another_backend(
    runs: dict[str, Path], tmp_path: Path, trained: str, served: str
) -> None:
    def plan(kind: str, name: str) -> TablePlan:
        path = str(tmp_path / name) if kind == "disk" else None
        return TablePlan(kind, path=path)  # type: ignore[arg-type]

    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    same, _ = load_run(runs[trained], tables=plan(trained, "same"))
    other, _ = load_run(runs[trained], tables=plan(served, "other"))
    assert isinstance(other.engram_tables()[0], OffloadedTable) == (served != "device")
    with torch.no_grad():
        assert torch.equal(other(ids).logits, same(ids).logits)
    same.close_tables()
    other.close_tables()


def test_exported_disk_tables_hold_the_checkpoint_rows(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    if not disk_available():
        pytest.skip("disk tier not available")
    from engramlm.tables.disk import disk_table

    main(["tables", "export", "--run", str(runs["host"]), "--out", str(tmp_path / "tables")])
    weights = checkpoint_tensors(runs["host"], "model.safetensors")["layers.1.engram.table.weight"]
    folder = tmp_path / "tables/engram_layer1"
    table = disk_table(folder, *weights.shape, cache_bytes=1 << 20, create=False)
    assert torch.equal(all_rows(table), weights)


def test_evaluating_on_any_tier_gives_the_same_loss(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text = str(stdlib_page("json"))
    scores = {
        storage: evaluate_run(runs["device"], data=text, max_batches=2, table_storage=storage)
        for storage in STORAGES
    }
    assert scores["host"] == scores["device"] == scores["disk"]
    assert not list(runs["device"].glob(".eval-*"))  # the disk tier's scratch tables are gone
    args = ["--run", str(runs["device"]), "--data", text, "--max-batches", "2"]
    main(["eval", *args, "--table-storage", "disk"])
    assert f"loss {scores['disk'][0]:.4f} nats" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# engramlm tables import: the inverse of export, into a run's newest checkpoint


def export(run: Path, out: Path) -> Path:
    main(["tables", "export", "--run", str(run), "--out", str(out)])
    return out


def import_into(run: Path, tables: Path, storage: str | None = None) -> None:
    args = ["tables", "import", "--tables", str(tables), "--run", str(run)]
    main(args + (["--storage", storage] if storage else []))


def refused_import(
    capsys: pytest.CaptureFixture[str], run: Path, tables: Path, storage: str | None = None
) -> str:
    """The one-line error of an import the CLI refuses (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        import_into(run, tables, storage)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(("trained", "storage"), [(t, s) for t in STORAGES for s in STORAGES])
def test_importing_a_runs_export_leaves_it_bitwise_unchanged_on_any_tier(
    runs: dict[str, Path], tmp_path: Path, trained: str, storage: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[trained], run)
    import_into(run, export(runs[trained], tmp_path / "exported"), storage)
    snapshot = checkpoint_dir(run, STEPS) / "tables" / TABLE
    assert snapshot.is_dir() == (storage == "disk")  # stored the way the chosen tier stores it
    assert json.loads((run / "config.json").read_text())["train"]["table_storage"] == storage
    verify_checkpoint(checkpoint_dir(run, STEPS))
    assert_same_state(run, runs[trained])  # weights, Adam moments and steps, bitwise


def test_imported_rows_replace_the_checkpoint_rows_and_keep_its_moments(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    from engramlm.tables.disk import DiskStore

    run = tmp_path / "run"
    shutil.copytree(runs["device"], run)
    exported = export(run, tmp_path / "exported")
    with DiskStore.open(exported / "engram_layer1" / "weight.engt") as store:
        store.write(torch.tensor([0, 5]), torch.full((2, store.dim), 0.5))
    import_into(run, exported)
    got, before = table_state(run), table_state(runs["device"])
    expected = before["weight"].clone()
    expected[[0, 5]] = 0.5
    assert torch.equal(got["weight"], expected)
    assert torch.equal(got["exp_avg"], before["exp_avg"]) and got["step"] == before["step"]


def flip_a_data_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[4096 + 8] ^= 0x01  # inside the first row
    file.write_bytes(bytes(data))


def edit_manifest(key: str, value: object) -> Any:
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / "tables.json").read_text())
        if key == "tokenizer_fingerprint":
            manifest[key] = value
        else:
            manifest["engram"][key] = value
        (folder / "tables.json").write_text(json.dumps(manifest))

    return edit


def replace_weights(num_rows_delta: int, dtype: torch.dtype = torch.float32) -> Any:
    def replace(folder: Path) -> None:
        from engramlm.tables.disk import DiskStore

        file = folder / "engram_layer1" / "weight.engt"
        with DiskStore.open(file) as old:
            shape = (old.num_rows + num_rows_delta, old.dim)
        file.unlink()
        DiskStore.create(file, *shape, dtype=dtype).close()
        (folder / "tables.json").unlink()  # a disk-tier folder: shapes are all there is to check

    return replace


def leave_open(folder: Path) -> Any:
    from engramlm.tables.disk import DiskStore

    store = DiskStore.open(folder / "engram_layer1" / "weight.engt")
    store.write(torch.tensor([1]), torch.ones(1, store.dim))
    store.flush()  # rows are in the file, but no checksum: the writer has not closed it
    return store


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (edit_manifest("seed", 7), r"model\.engram\.seed: tables 7, run 0"),
        (edit_manifest("tokenizer_fingerprint", "0123"), "tokenizer_fingerprint: tables '0123'"),
        (replace_weights(+1), r"weight\.engt is \[\d+, 16\], the run's engram_layer1 table is"),
        (replace_weights(0, torch.bfloat16), "stores torch.bfloat16 rows"),
        (lambda f: os.rename(f / "engram_layer1", f / "engram_layer2"), r"\['engram_layer2'\]"),
        (lambda f: truncate(f / "engram_layer1" / "weight.engt"), "truncated"),
        (lambda f: flip_a_data_bit(f / "engram_layer1" / "weight.engt"), "checksum mismatch"),
        (lambda f: (f / "engram_layer1" / "weight.engt.journal").write_bytes(b"x"), "journaled"),
        (leave_open, "not closed cleanly"),
    ],
    ids=[
        "hash",
        "tokenizer",
        "shape",
        "dtype",
        "layers",
        "truncated",
        "corrupt",
        "journal",
        "open",
    ],
)
def test_import_refuses_tables_that_do_not_fit_naming_the_problem_and_leaves_the_run(
    runs: dict[str, Path],
    tmp_path: Path,
    damage: Any,
    problem: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["host"], run)
    exported = export(run, tmp_path / "exported")
    still_open = damage(exported)
    assert re.search(problem, refused_import(capsys, run, exported, "disk"))
    if damage is leave_open:
        still_open.close()
    assert_same_state(run, runs["host"])
    assert json.loads((run / "config.json").read_text())["train"]["table_storage"] == "host"


def test_import_of_one_tables_folder_says_to_pass_its_parent(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exported = export(runs["host"], tmp_path / "exported")
    err = refused_import(capsys, runs["host"], exported / "engram_layer1")
    assert "pass the folder that holds the engram_layer<i> folders" in err


def _huge_page_kb(tensor: torch.Tensor) -> int:
    """AnonHugePages of the mapping that holds ``tensor``'s first byte (/proc/self/smaps)."""
    address = tensor.untyped_storage().data_ptr() + (2 << 20)  # inside the aligned interior
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def _thp_on_request() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _thp_on_request(), reason="needs Linux transparent huge pages")
def test_in_memory_tables_are_backed_by_huge_pages() -> None:
    """DeviceTable's weights (also when materialised from "meta") and a host MemoryStore's rows
    are advised before they are first touched, so they fault in 2 MB pages; small tensors and
    values are untouched by the advice."""
    from engramlm.tables.hugepages import use_huge_pages

    table = DeviceTable(1 << 18, 64)  # 64 MB
    assert _huge_page_kb(table.weight) > 0
    with torch.device("meta"):
        late = DeviceTable(1 << 18, 64)
    late.to_empty(device="cpu")
    late.reset_parameters()
    assert _huge_page_kb(late.weight) > 0
    assert late.weight.std().item() == pytest.approx(TABLE_INIT_STD, rel=0.05)
    fp8_table = DeviceTable(1 << 18, 256, dtype=torch.float8_e4m3fn)  # 66 MB of packed rows
    assert _huge_page_kb(fp8_table.packed) > 0 and not fp8_table.packed.any()
    store = MemoryStore(1 << 18, 64, pin=False)
    assert _huge_page_kb(store.data) > 0 and not store.data.any()
    plain = torch.randn(1 << 20, 16)  # touched before any advice: keeps its values
    before = plain.clone()
    use_huge_pages(plain)
    assert torch.equal(plain, before)
    assert not use_huge_pages(torch.zeros(1000))  # under 2 MB: left alone


def test_huge_page_share_counts_the_mappings_a_tensor_spans() -> None:
    """From smaps text: a tensor over the end of one mapping and the start of the next gets
    each mapping's huge pages in proportion to the part it covers; no file, no answer."""
    from engramlm.tables.hugepages import huge_page_share

    t = torch.empty(4 << 20, dtype=torch.uint8)  # 4 MB
    start = t.untyped_storage().data_ptr()
    mid = start + (1 << 20)  # 1 MB in the first mapping, 3 MB in the second
    a_lo, b_hi = mid - (4 << 20), mid + (6 << 20)  # 4 MB and 6 MB mappings
    smaps = "\n".join(
        [
            f"{a_lo:x}-{mid:x} rw-p 00000000 00:00 0",
            "Size:               4096 kB",
            "AnonHugePages:      4096 kB",  # all huge: the tensor's 1 MB counts as huge
            f"{mid:x}-{b_hi:x} rw-p 00000000 00:00 0",
            "Size:               6144 kB",
            "AnonHugePages:      2048 kB",  # a third huge: 1 MB of the tensor's 3 MB
            "",
            f"{b_hi + 4096:x}-{b_hi + 8192:x} r--p 00000000 00:00 0",
            "AnonHugePages:         0 kB",
        ]
    )
    assert huge_page_share(t, smaps) == pytest.approx((1 + 1) / 4)
    assert huge_page_share(t, "") is None  # no mapping holds it
