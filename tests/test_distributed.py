"""Row-wise sharded Engram tables on 2 CPU ranks (gloo), against one process on the same batch.

Workers are spawned processes talking over 127.0.0.1; each writes its results to a file that
the test (the parent) compares with a single-process run. One launch runs every variant, so
the interpreter and torch start-up is paid once.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from engramlm.config import ModelConfig
from engramlm.model import EngramLM
from engramlm.tables import TablePlan
from engramlm.train import TrainConfig, build_optimizers

dist = pytest.importorskip("torch.distributed", reason="torch built without torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)

from engramlm.distributed import (  # noqa: E402 (after the availability check)
    ParallelPlan,
    PeerError,
    all_reduce_expert_counts,
    owner_of,
    parallelize,
    send_counts,
    shard_range,
    sharded_tables,
    table_optimizer,
)

pytestmark = pytest.mark.distributed

WORLD, STEPS, B, T = 2, 3, 4, 16  # global batch B, split evenly over the ranks
VARIANTS = {  # name -> ParallelPlan fields
    "ddp-all_to_all": {"dense": "ddp", "exchange": "all_to_all"},
    "ddp-p2p": {"dense": "ddp", "exchange": "p2p"},
    "fsdp-all_to_all": {"dense": "fsdp", "exchange": "all_to_all"},
}
TIMEOUT_S = 10.0  # process-group set-up
PEER_TIMEOUT_S = 3.0  # the table exchanges in the failure tests


# --- shared by the workers and the reference ------------------------------------------------
def _model() -> EngramLM:
    torch.manual_seed(0)
    return EngramLM(ModelConfig.preset("tiny-engram"), tables=TablePlan())


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    V = ModelConfig.preset("tiny-engram").vocab_size
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, V, (B, T + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


TRAIN = TrainConfig(lr=1e-2, table_lr_mult=5.0, weight_decay=0.1)


def _backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, parts: int = 1) -> float:
    """Mean loss over the batch, computed as ``parts`` equal micro-batches; backward."""
    loss = sum(
        model(xp, targets=yp).loss for xp, yp in zip(x.chunk(parts), y.chunk(parts), strict=True)
    )
    (loss / parts).backward()
    return float(loss.detach()) / parts


def _update(inner: EngramLM, optimizers: dict[str, Any]) -> None:
    """The rest of ``train.train``'s step: clip dense, step, zero, MoE bias update."""
    dense = [p for p in inner.dense_parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(dense, TRAIN.grad_clip, foreach=False)
    for opt in optimizers.values():
        opt.step()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    if dist.is_initialized():
        all_reduce_expert_counts(inner)
    inner.update_moe_biases()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


# --- the workers ----------------------------------------------------------------------------
def _train_variant(rank: int, plan: ParallelPlan) -> dict[str, Any]:
    inner = _model()
    model = parallelize(inner, plan)
    optimizers = build_optimizers(inner, TRAIN)
    assert "tables" not in optimizers  # sharded tables are ours to add
    tables = sharded_tables(inner)
    optimizers["tables"] = table_optimizer(tables, lr=TRAIN.lr * TRAIN.table_lr_mult)
    losses, grads = [], {}
    lo, hi = rank * B // WORLD, (rank + 1) * B // WORLD
    for step, (x, y) in enumerate(_batches()):
        loss = torch.tensor(_backward(model, x[lo:hi], y[lo:hi]))
        dist.all_reduce(loss)
        losses.append(float(loss) / WORLD)
        if step == 0:
            grads = {n: _full(p.grad) for n, p in inner.named_parameters()}
            for t in tables:  # this rank's rows: sum of the queued row gradients
                shard = torch.zeros(t.stop - t.start, t.dim)
                for rows, g in t.local.pending:
                    shard.index_add_(0, rows, g.reshape(-1, t.dim))
                grads[t.name] = shard
        _update(inner, optimizers)
    return {
        "losses": losses,
        "grads": grads,
        "params": {n: _full(p) for n, p in inner.named_parameters()},
        "biases": {n: b.clone() for n, b in inner.named_buffers() if n.endswith("expert_bias")},
        "shards": {
            t.name: (t.start, t.stop, t.local.weight_store.data[: t.stop - t.start].clone())
            for t in tables
        },
        "dedup": [(t.ids_requested, t.ids_sent) for t in tables],
    }


def _fail_mid_step(rank: int, how: str) -> dict[str, Any]:
    """Rank 1 dies (``how="die"``) or stalls (``"hang"``) inside its second step's forward, at
    the table lookup; rank 0 must get a :class:`PeerError` instead of waiting for ever."""
    inner = _model()
    model = parallelize(inner, ParallelPlan(timeout_s=PEER_TIMEOUT_S))
    x, y = _batches()[0]
    model(x[rank : rank + 1], targets=y[rank : rank + 1]).loss.backward()  # a healthy step
    if rank == 1:
        table = sharded_tables(inner)[0]
        if how == "die":
            table.lookup = lambda rows: os._exit(3)  # type: ignore[method-assign]
        else:
            table.lookup = lambda rows: time.sleep(10 * PEER_TIMEOUT_S)  # type: ignore[method-assign]
    t0 = time.monotonic()
    try:
        model(x[:1], targets=y[:1]).loss.backward()
    except PeerError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def _worker(rank: int, port: int, out: str, job: str) -> None:
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=TIMEOUT_S),
        )
        if job == "train":
            for name, fields in VARIANTS.items():
                result[name] = _train_variant(rank, ParallelPlan(timeout_s=TIMEOUT_S, **fields))
        else:
            result = _fail_mid_step(rank, job)
    except BaseException:
        result = {"traceback": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if job != "train":
        os._exit(0)  # the peer is gone: tearing the group down could wait on it
    dist.destroy_process_group()


def _launch(tmp: Path, job: str, timeout: float = 90.0) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp), job)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    waited = procs if job == "train" else procs[:1]  # failure jobs: rank 1 is the casualty
    for p in waited:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(waited) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {timeout} s"
    results = []
    for r in range(len(waited)):
        path = tmp / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else {})
        assert "traceback" not in results[-1], f"rank {r} failed:\n{results[-1]['traceback']}"
    return results


# --- the single-process reference -----------------------------------------------------------
def _reference(parts: int) -> dict[str, Any]:
    """One process, the global batch. ``parts=1``: one forward over it. ``parts=WORLD``: the
    same mean loss over the ranks' micro-batches, i.e. the same arithmetic shapes as the ranks.
    """
    model = _model()
    optimizers = build_optimizers(model, TRAIN)  # SparseAdam on device tables
    tables = {f"engram_layer{b.layer_id}": b.engram.table for b in model.layers if b.engram}
    losses, grads = [], {}
    for step, (x, y) in enumerate(_batches()):
        losses.append(_backward(model, x, y, parts))
        if step == 0:
            grads = {n: p.grad.to_dense().clone() for n, p in model.named_parameters()}
            grads.update({name: t.weight.grad.to_dense().clone() for name, t in tables.items()})
        _update(model, optimizers)
    return {
        "losses": losses,
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "biases": {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")},
        "tables": {name: t.weight.detach().clone() for name, t in tables.items()},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], ...]:
    ranks = _launch(tmp_path_factory.mktemp("dist"), "train")
    # The ranks compute with one thread (_worker); so must the reference, or matmuls sum in
    # another order and Adam amplifies the last-bit differences past 1e-6 in three steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ranks, _reference(parts=1), _reference(parts=WORLD)
    finally:
        torch.set_num_threads(threads)


def _gathered(ranks: list[dict[str, Any]], variant: str, name: str) -> torch.Tensor:
    """A table's rows, put together from the ranks' shards in owner order."""
    pieces = sorted(result[variant]["shards"][name] for result in ranks)
    assert [p[:2] for p in pieces] == [
        shard_range(r, pieces[-1][1], WORLD) for r in range(WORLD)
    ], "shards are not the placement rule's ranges"
    return torch.cat([p[2] for p in pieces])


EXACT = {"rtol": 0.0, "atol": 1e-6}


# --- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_forward_and_backward_match_single_process(runs, variant: str) -> None:
    """Losses of every step and the first step's gradients (dense and table rows) equal one
    process's on the global batch; row gradients gathered from the owners' shards."""
    ranks, ref, _ = runs
    for r, result in enumerate(ranks):
        got = result[variant]
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(ref["losses"]), **EXACT
        )
        for name, g in ref["grads"].items():
            if "engram.table" in name or name in ref["tables"]:
                continue
            torch.testing.assert_close(got["grads"][name], g, **EXACT, msg=f"rank {r} {name}")
    for name in ref["tables"]:
        pieces = sorted(
            (res[variant]["shards"][name][0], res[variant]["grads"][name]) for res in ranks
        )
        grad = torch.cat([g for _, g in pieces])
        full = ref["grads"][f"layers.{name.removeprefix('engram_layer')}.engram.table.weight"]
        torch.testing.assert_close(grad, full, **EXACT, msg=f"row gradients of {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_training_matches_single_process(runs, variant: str) -> None:
    """After 3 optimiser steps (AdamW dense, lazy Adam on the shards) every weight equals the
    one-process run on the same micro-batches."""
    ranks, _, ref = runs
    for r, result in enumerate(ranks):
        got = result[variant]
        dense = {n: p for n, p in ref["params"].items() if "engram.table" not in n}
        assert set(got["params"]) == set(dense), f"rank {r}: parameter names differ"
        for name, p in dense.items():
            torch.testing.assert_close(got["params"][name], p, **EXACT, msg=f"rank {r} {name}")
        for name, b in ref["biases"].items():
            torch.testing.assert_close(got["biases"][name], b, **EXACT)
    for name, full in ref["tables"].items():
        rows = _gathered(ranks, variant, name)
        torch.testing.assert_close(rows, full, **EXACT, msg=f"table {name}")
        initial = {
            f"engram_layer{b.layer_id}": b.engram.table.weight for b in _model().layers if b.engram
        }
        assert not torch.equal(rows, initial[name]), "the table did not train"


def test_dedup_sends_fewer_ids_than_requested(runs) -> None:
    ranks, _, _ = runs
    requested, sent = map(sum, zip(*ranks[0]["ddp-all_to_all"]["dedup"], strict=True))
    assert 0 < sent < requested  # tiny batches repeat few n-grams, but the pad rows repeat


@pytest.mark.parametrize("how", ["die", "hang"])
def test_failed_peer_raises_peer_error_within_timeout(tmp_path: Path, how: str) -> None:
    (survivor,) = _launch(tmp_path, how, timeout=60.0)
    assert survivor["error"] is not None, "rank 0 finished a step without its peer"
    assert "'engram_layer1': all_to_all of id counts failed on rank 0 of 2" in survivor["error"]
    assert survivor["seconds"] < 2 * PEER_TIMEOUT_S


@pytest.mark.parametrize("seed", range(20))
def test_ids_reach_only_their_owner(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    num_rows = int(torch.randint(1, 5000, (1,), generator=g))
    world = int(torch.randint(1, 9, (1,), generator=g))
    ids = torch.randint(0, num_rows, (int(torch.randint(0, 400, (1,), generator=g)),), generator=g)
    unique = torch.unique(ids)
    chunks = unique.split(send_counts(unique, num_rows, world).tolist())
    assert len(chunks) == world
    for rank, chunk in enumerate(chunks):
        start, stop = shard_range(rank, num_rows, world)
        assert bool(((chunk >= start) & (chunk < stop)).all()), (rank, chunk, start, stop)
    covered = [shard_range(r, num_rows, world) for r in range(world)]
    assert covered[0][0] == 0 and covered[-1][1] == num_rows
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))  # a partition
    owners = owner_of(torch.arange(num_rows), num_rows, world)
    assert int(owners.min()) >= 0 and int(owners.max()) < world


def test_parallel_plan_rejects_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="dense"):
        ParallelPlan(dense="zero3")  # type: ignore[arg-type]


@pytest.fixture
def single_rank(tmp_path: Path) -> Any:
    """A one-rank gloo group in this process, torn down afterwards."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("exchange", ["all_to_all", "p2p"])
def test_sharded_table_is_a_table_that_queues_row_gradients(single_rank, exchange: str) -> None:
    from engramlm.distributed import ShardedTable
    from engramlm.tables import DeviceTable, Table

    full = DeviceTable(50, 4)
    table = ShardedTable(50, 4, group=single_rank, exchange=exchange)  # type: ignore[arg-type]
    table.load_from(full)
    assert isinstance(table, Table)
    rows = torch.tensor([[3, 7, 3], [49, 0, 7]])
    out = table.lookup(rows)  # [2, 3, 4]
    torch.testing.assert_close(out, full.weight[rows].detach(), rtol=0, atol=0)
    out.sum().backward()
    local, grads = table.local.coalesced_grad()  # type: ignore[misc]
    assert local.tolist() == [0, 3, 7, 49]
    torch.testing.assert_close(grads, torch.tensor([1.0, 2.0, 2.0, 1.0])[:, None].expand(4, 4))
    assert table.ids_requested == 6 and table.ids_sent == 4


def test_out_of_range_row_is_refused_before_any_exchange(single_rank) -> None:
    from engramlm.distributed import ShardedTable

    table = ShardedTable(10, 4, group=single_rank)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        table.lookup(torch.tensor([10]))
