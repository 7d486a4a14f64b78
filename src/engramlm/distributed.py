"""Parallelism applied to a built model: row-wise sharded Engram tables + data-parallel dense part.

SPEC §5: the tables are sharded across ranks; an all-to-all gathers the rows a batch needs in
forward and sends the row gradients back in backward, so table capacity grows linearly with
ranks. This is the only module that imports ``torch.distributed`` (model code never does).

Placement rule (torchrec's ``ROW_WISE``): global row ``r`` of a ``num_rows``-row table lives on
rank ``r // S`` with ``S = ceil(num_rows / world)``, i.e. rank ``k`` owns the contiguous range
``[k S, min((k + 1) S, num_rows))`` (the last ranks' ranges may be shorter or empty). Hashed
ids are uniform within each head's segment, so contiguous ranges balance as well as ``r % world``
would, and they keep *sorted* ids grouped by owner: after ``torch.unique`` (which sorts) the send
buffer is already in owner order, and each owner's slice is cut by counts derived from the same
rule - an id cannot reach a rank that does not own it (``tests/test_distributed.py`` checks it).

One lookup on every rank, in lockstep (every rank runs the same model):

1. dedupe the ids (``torch.unique``; :attr:`ShardedTable.ids_requested` vs
   :attr:`ShardedTable.ids_sent` reports the saving), count them per owner;
2. exchange the counts, then the ids; each owner reads the rows from its shard;
3. exchange the rows back; ``values[inverse]`` restores the caller's [*] layout.

Backward reverses step 3: row gradients are summed per unique id (``index_add`` over the same
inverse), divided by ``world`` and sent to their owners, who queue them on their shard
(an :class:`~engramlm.tables.OffloadedTable` in host memory or on disk) for
:class:`ShardedTableAdam` - ``torch.optim.SparseAdam``'s arithmetic. Dividing by ``world``
matches DDP: each rank's loss is a mean over its local batch, so averaging over ranks gives the
gradient of the global-batch mean.

Collectives: ``all_to_all_single`` (gloo has it on CPU, checked with torch 2.13). Backends
without it fall back to pairwise ``isend``/``irecv`` with every peer (``exchange="p2p"``;
``"auto"`` probes the backend once). Table traffic runs on a gloo process group of its own, so
it never interleaves with DDP's gradient all-reduces on the default group. The exchanged
tensors are CPU tensors (the shards live in host memory or on disk).

Building: :func:`build_model` constructs the model, replaces each table by this rank's shard
*before* initialising, then initialises - each rank draws every row as one process would (so
the RNG and every shard equal the one-process run) but keeps only its own: the full table is
never in memory. :func:`parallelize` shards an already-initialised model instead (each rank
copies its rows out of its full copy).

Training under ``torchrun`` (:func:`launch_from_env`, used by ``engramlm.train``): every rank
reads, of each ``world`` consecutive micro-batches of the one training stream, its own
(:class:`RankBatches`), so a run on W ranks with ``grad_accum`` A equals one process with
``grad_accum`` A x W. Checkpoints are sharded (:func:`save_checkpoint`): every rank writes its
rows, rank 0 the dense part and the manifest; they load into any world size, one process
included (``engramlm.checkpoint``).

Failures: every exchange is bounded by the process group's timeout; a dead or stalled peer
raises :class:`PeerError` naming the table, the collective and the rank, instead of hanging.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engramlm import checkpoint
from engramlm.data import Batch, HashFn, TrainBatches
from engramlm.tables import MemoryStore, OffloadedTable, TableAdam, TablePlan
from engramlm.tables.base import TABLE_INIT_STD
from engramlm.tables.offload import row_chunks
from engramlm.tables.plan import read_rows

logger = logging.getLogger(__name__)

DenseStrategy = Literal["ddp", "fsdp"]
Exchange = Literal["auto", "all_to_all", "p2p"]


@dataclass(frozen=True)
class ParallelPlan:
    """How :func:`parallelize` / :func:`build_model` distribute a model.

    ``dense``: ``"ddp"`` (DistributedDataParallel, replicated dense weights) or ``"fsdp"``
    (FSDP2 ``fully_shard`` per block and at the root). ``exchange``: the table collective,
    ``"auto"`` = ``all_to_all`` when the backend has it, else ``"p2p"``. ``timeout_s`` bounds
    each table exchange (the table process group's timeout). ``tables``: where each rank keeps
    its shards - ``host`` memory (``device`` means the same: the exchange is on the CPU) or
    ``disk``, one folder per rank under ``tables.path`` (``rank<r>/<table>/``).
    """

    dense: DenseStrategy = "ddp"
    exchange: Exchange = "auto"
    timeout_s: float = 600.0
    tables: TablePlan = TablePlan("host")

    def __post_init__(self) -> None:
        if self.dense not in ("ddp", "fsdp"):
            raise ValueError(f"dense must be 'ddp' or 'fsdp', got {self.dense!r}")
        if self.exchange not in ("auto", "all_to_all", "p2p"):
            raise ValueError(
                f"exchange must be 'auto', 'all_to_all' or 'p2p', got {self.exchange!r}"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


class PeerError(RuntimeError):
    """A collective failed: a peer rank died, or did not answer within the timeout."""


# --- the placement rule ---------------------------------------------------------------------
def shard_size(num_rows: int, world: int) -> int:
    """Rows per shard, S = ceil(num_rows / world)."""
    return -(-num_rows // world)


def shard_range(rank: int, num_rows: int, world: int) -> tuple[int, int]:
    """[start, stop) of the global rows ``rank`` owns (empty when start == stop)."""
    size = shard_size(num_rows, world)
    return min(rank * size, num_rows), min((rank + 1) * size, num_rows)


def owner_of(rows: Tensor, num_rows: int, world: int) -> Tensor:
    """[*] global rows -> [*] owning rank, ``r // ceil(num_rows / world)``."""
    return torch.div(rows, shard_size(num_rows, world), rounding_mode="floor")


def send_counts(sorted_rows: Tensor, num_rows: int, world: int) -> Tensor:
    """[n] ascending rows -> [world] ids per owner; slicing by these counts cuts owner p's ids.

    Owners are non-decreasing along sorted rows (the contiguous rule), so the p-th slice of
    ``sorted_rows.split(counts)`` holds exactly the rows owned by p.
    """
    return torch.bincount(owner_of(sorted_rows, num_rows, world), minlength=world)


# --- exchanging variable-size chunks with every rank ----------------------------------------
class _Exchanger:
    """Sends chunk p of a tensor to rank p and receives one chunk from each: the all-to-all."""

    def __init__(self, group: Any, exchange: Literal["all_to_all", "p2p"], name: str) -> None:
        self.group, self.exchange, self.name = group, exchange, name
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.bytes_sent = 0  # payload this rank sent to other ranks, summed over exchanges

    def __call__(
        self, x: Tensor, send: list[int], recv: list[int], what: str
    ) -> Tensor:  # [sum(send), *] -> [sum(recv), *]
        out = x.new_empty(sum(recv), *x.shape[1:])
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        self.bytes_sent += (sum(send) - send[self.rank]) * row_bytes
        try:
            if self.exchange == "all_to_all":
                dist.all_to_all_single(out, x, recv, send, group=self.group)
            else:
                self._p2p(out, x, send, recv)
        except RuntimeError as e:
            raise PeerError(
                f"{self.name}: {self.exchange} of {what} failed on rank {self.rank} of "
                f"{self.world}; a peer rank died or did not answer within the timeout: {e}"
            ) from e
        return out

    def _p2p(self, out: Tensor, x: Tensor, send: list[int], recv: list[int]) -> None:
        outs, ins = out.split(recv), x.split(send)
        outs[self.rank].copy_(ins[self.rank])
        peers = [p for p in range(self.world) if p != self.rank]  # ranks within the group
        ops = [
            dist.P2POp(dist.isend, ins[p].contiguous(), group=self.group, group_peer=p)
            for p in peers
        ]
        ops += [dist.P2POp(dist.irecv, outs[p], group=self.group, group_peer=p) for p in peers]
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()


# --- the sharded table ----------------------------------------------------------------------
class _ShardedLookup(torch.autograd.Function):
    """values[inverse] forward; backward sums row gradients per unique id and ships them home.

    ``anchor`` is a 0-element leaf that requires grad: it puts the lookup on the autograd tape.
    """

    @staticmethod
    def forward(
        ctx: Any, anchor: Tensor, values: Tensor, inverse: Tensor, route: Any, table: Any
    ) -> Tensor:
        ctx.inverse, ctx.route, ctx.table = inverse, route, table
        ctx.num_unique = values.shape[0]
        return values[inverse]  # [n, dim]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, ...]:
        table: ShardedTable = ctx.table
        grad = grad.detach().to("cpu", torch.float32)
        unique_grad = grad.new_zeros(ctx.num_unique, table.dim)
        unique_grad.index_add_(0, ctx.inverse, grad).div_(table.world)  # mean over ranks (DDP)
        table._send_grads(unique_grad, ctx.route)
        return None, None, None, None, None


@dataclass
class _Route:
    send: list[int]  # ids sent to each rank
    recv: list[int]  # ids received from each rank
    local: Tensor  # [sum(recv)] shard-local rows this rank served


class ShardedTable(nn.Module):
    """A :class:`~engramlm.tables.Table` whose rows are split row-wise across ranks.

    This rank's shard is ``local``, an :class:`~engramlm.tables.OffloadedTable` holding global
    rows ``[start, stop)`` at shard-local ids ``0 .. stop - start``, in host memory (default)
    or, with a ``disk`` ``storage`` plan, in files under ``<storage.path>/rank<r>/<name>/``
    (see the module docstring for the rule and the exchange). ``local`` is deliberately not a
    registered submodule: the model's ``init_weights`` visits submodules (it calls
    :meth:`reset_parameters` on this table only), and its rows are checkpointed per shard
    (``checkpoint.write_table_shards``), not in the model's state dict, which holds the dense
    part only. Train the shards with :func:`table_optimizer`. Every rank must look up every
    sharded table the same number of times, in the same order, and run backward for each
    (lockstep data parallelism).
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        group: Any = None,
        exchange: Literal["all_to_all", "p2p"] = "all_to_all",
        name: str = "table",
        storage: TablePlan | None = None,
    ) -> None:
        super().__init__()
        self.num_rows, self.dim, self.name = num_rows, dim, name
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.start, self.stop = shard_range(self.rank, num_rows, self.world)
        # An empty shard still gets one row, never addressed: stores must be non-empty.
        rows = max(1, self.stop - self.start)
        if storage is not None and storage.kind == "disk":
            from engramlm.tables.disk import disk_table

            assert storage.path is not None  # TablePlan validates it
            folder = Path(storage.path) / f"rank{self.rank:05d}" / name
            local = disk_table(
                folder, rows, dim, cache_bytes=storage.cache_mb << 20, device="cpu", init=False
            )
        else:
            local = OffloadedTable(*(MemoryStore(rows, dim) for _ in range(3)), device="cpu")
        object.__setattr__(self, "local", local)  # not registered: see the class docstring
        self.local: OffloadedTable
        self._exchange = _Exchanger(group, exchange, f"sharded table {name!r}")
        self._anchor = torch.zeros(0, device="cpu", requires_grad=True)
        self.ids_requested = 0  # ids passed to lookup, summed over lookups
        self.ids_sent = 0  # distinct ids actually exchanged after dedup
        self.backward_since_step = False  # set by backward; ShardedTableAdam steps on it

    @property
    def dedup_saving(self) -> float:
        """Fraction of id (and row, and gradient) traffic saved by deduplication."""
        return 1.0 - self.ids_sent / self.ids_requested if self.ids_requested else 0.0

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent to other ranks (counts, ids, rows, row gradients) so far."""
        return self._exchange.bytes_sent

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Rows N(0, TABLE_INIT_STD^2) drawn for the *whole* table, in the chunks
        ``OffloadedTable.reset_parameters`` uses (which equal ``DeviceTable``'s single
        ``normal_``), keeping this rank's rows; moments zero.

        Every rank draws every row so that the RNG advances as in one process and each shard
        equals the same rows of the one-process initialisation: O(table) time per rank, but
        one chunk of memory, never the whole table.
        """
        chunks = list(row_chunks(self.num_rows))
        if len(chunks) > 1 and (chunks[-1][1] - chunks[-1][0]) * self.dim < 16:
            chunks[-2:] = [(chunks[-2][0], chunks[-1][1])]  # as OffloadedTable.reset_parameters
        for start, stop in chunks:
            values = torch.empty(stop - start, self.dim, device="cpu")
            nn.init.normal_(values, std=TABLE_INIT_STD, generator=generator)
            lo, hi = max(start, self.start), min(stop, self.stop)
            if lo < hi:
                self.local.write_range(lo - self.start, values[lo - start : hi - start])
        self.local.exp_avg.zero_()
        self.local.exp_avg_sq.zero_()
        self.local.step_count = 0
        self.local.pending.clear()

    def prefetch(self, rows: Tensor) -> None:
        """Not used: the exchange is a collective, issued by ``lookup`` on every rank."""

    def warm(self, rows: Tensor) -> None:
        """Not used: the rows a rank serves come from every rank's batch, known only at the
        exchange."""

    def lookup(self, rows: Tensor) -> Tensor:  # [*] -> [*, dim]
        flat = rows.detach().reshape(-1).to("cpu", torch.int64)  # [n]
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_rows):
            raise IndexError(
                f"table row out of range [0, {self.num_rows}): got "
                f"[{int(flat.min())}, {int(flat.max())}]"
            )
        unique, inverse = torch.unique(flat, return_inverse=True)  # [u] ascending, [n]
        self.ids_requested += flat.numel()
        self.ids_sent += unique.numel()
        send = send_counts(unique, self.num_rows, self.world)  # [world]
        recv = self._exchange(send, [1] * self.world, [1] * self.world, "id counts")
        send_l, recv_l = send.tolist(), recv.tolist()
        wanted = self._exchange(unique, send_l, recv_l, "ids")  # [r] global, all ours
        local = wanted - self.start
        # Our invariant, by construction of send_counts: every id received is ours.
        assert local.numel() == 0 or (int(local.min()) >= 0 and int(wanted.max()) < self.stop)
        served = read_rows(self.local, local) if local.numel() else torch.zeros(0, self.dim)
        values = self._exchange(served, recv_l, send_l, "rows")  # [u, dim]
        route = _Route(send_l, recv_l, local)
        out = _ShardedLookup.apply(self._anchor, values, inverse, route, self)  # [n, dim]
        return out.to(rows.device).view(*rows.shape, self.dim)

    def _send_grads(self, unique_grad: Tensor, route: _Route) -> None:
        grads = self._exchange(unique_grad, route.send, route.recv, "row gradients")  # [r, dim]
        self.backward_since_step = True
        if route.local.numel():
            self.local.pending.append((route.local, grads))

    @torch.no_grad()
    def load_from(self, table: Any) -> None:
        """Copy the rows this rank owns from a full table of any backend (initialisation)."""
        for start, stop in row_chunks(self.stop - self.start):
            rows = torch.arange(self.start + start, self.start + stop)
            self.local.write_range(start, read_rows(table, rows))

    def shard(self, module_name: str) -> checkpoint.TableShard:
        """This rank's rows, as checkpoints save and load them (``module_name``: where the
        table sits in the model, its key in a one-process state dict)."""
        return checkpoint.TableShard(module_name, self.start, self.stop, self.num_rows, self.local)

    def close(self) -> None:
        """Flush and release the shard's stores (disk files record their checksum)."""
        self.local.close()

    def extra_repr(self) -> str:
        return (
            f"num_rows={self.num_rows}, dim={self.dim}, rank={self.rank}/{self.world}, "
            f"rows=[{self.start}, {self.stop}), exchange={self._exchange.exchange}, "
            f"local={self.local.extra_repr()}"
        )


class ShardedTableAdam(TableAdam):
    """:class:`TableAdam` over the shards, with the one-process step count.

    SparseAdam advances a table's step (its bias correction) whenever the table had a
    gradient; a shard whose rows no id of the global batch addressed has none, yet the table
    as a whole did. Every rank runs backward for every lookup (lockstep), so each shard knows
    the table was addressed (``backward_since_step``) and advances its step anyway.
    """

    def __init__(self, tables: list[ShardedTable], **kwargs: Any) -> None:
        super().__init__([t.local for t in tables], **kwargs)
        self.sharded = tables

    @torch.no_grad()
    def step(self) -> None:
        idle = [t for t in self.sharded if t.backward_since_step and not t.local.pending]
        super().step()
        for table in idle:
            table.local.step_count += 1
        for table in self.sharded:
            table.backward_since_step = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for table in self.sharded:
            table.backward_since_step = False


def table_optimizer(
    tables: list[ShardedTable],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> ShardedTableAdam:
    """Lazy Adam (SparseAdam's arithmetic) over each rank's shards; defaults as in ``train``."""
    return ShardedTableAdam(tables, lr=lr, betas=betas, eps=eps)


# --- applying a plan ------------------------------------------------------------------------
def _resolve_exchange(plan: ParallelPlan, group: Any) -> Literal["all_to_all", "p2p"]:
    """``auto``: probe ``all_to_all_single`` once (every rank gets the same answer)."""
    if plan.exchange != "auto":
        return plan.exchange
    world = dist.get_world_size(group)
    try:
        out = torch.empty(world, dtype=torch.int64)
        dist.all_to_all_single(out, torch.zeros(world, dtype=torch.int64), group=group)
    except (RuntimeError, NotImplementedError) as e:
        logger.info("backend has no all_to_all (%s): tables use isend/irecv", e)
        return "p2p"
    return "all_to_all"


def _table_label(module_name: str) -> str:
    """``layers.1.engram.table`` -> ``engram_layer1`` (errors, disk folders); else the owner."""
    m = re.fullmatch(r"layers\.(\d+)\.engram\.table", module_name)
    return f"engram_layer{m[1]}" if m else module_name.rpartition(".")[0].replace(".", "_")


def _shard_tables(model: nn.Module, plan: ParallelPlan, group: Any, copy_rows: bool) -> None:
    """Replace every table of ``model.engram_tables()`` by this rank's :class:`ShardedTable`,
    copying its rows from the full table when ``copy_rows`` (else they await initialisation).
    """
    table_group = dist.new_group(
        dist.get_process_group_ranks(group),
        timeout=timedelta(seconds=plan.timeout_s),
        backend="gloo",  # the shards and the exchanged rows are on the CPU
    )
    exchange = _resolve_exchange(plan, table_group)
    tables = {id(t) for t in model.engram_tables()}  # type: ignore[operator]
    for name, full in list(model.named_modules()):
        if id(full) not in tables:
            continue
        sharded = ShardedTable(
            full.num_rows,
            full.dim,
            group=table_group,
            exchange=exchange,
            name=_table_label(name),
            storage=plan.tables,
        )
        if copy_rows:
            sharded.load_from(full)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, sharded)  # the full table is dropped here


def _wrap_dense(model: nn.Module, plan: ParallelPlan, group: Any) -> nn.Module:
    if plan.dense == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # No buffer sync each forward: MoE expert counts are per-rank until
        # all_reduce_expert_counts, and rank 0's must not overwrite the others'.
        return DistributedDataParallel(model, process_group=group, forward_sync_buffers=False)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    device_type = next(model.parameters()).device.type
    mesh = DeviceMesh.from_group(group, device_type=device_type)
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def parallelize(model: nn.Module, plan: ParallelPlan | None = None, group: Any = None) -> nn.Module:
    """Shard every Engram table of an initialised ``model`` across ``group``'s ranks and wrap
    the dense part.

    Every rank must call this on a model built identically (same config, same seed): each
    rank keeps, from its copy of every table, the rows it owns, so the sharded model starts
    with the single-process model's weights (:func:`build_model` avoids the full copies).
    Tables already sharded are left alone. Returns the wrapped model (DDP module, or the model
    itself with FSDP2); reach the tables through :func:`sharded_tables` of the inner model.
    Dense gradients are averaged over ranks, as are the table row gradients.
    """
    plan = plan or ParallelPlan()
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed initialised (init_process_group)")
    group = group or dist.group.WORLD
    if not sharded_tables(model):
        _shard_tables(model, plan, group, copy_rows=True)
    return _wrap_dense(model, plan, group)


def build_model(
    config: Any,
    compressed_vocab: Any = None,
    plan: ParallelPlan | None = None,
    *,
    group: Any = None,
    device: str | torch.device = "cpu",
) -> tuple[Any, nn.Module]:
    """``EngramLM(config, compressed_vocab)`` with sharded tables, no rank ever holding a
    whole table -> (the model, the wrapped model to train).

    Equal to one process's ``torch.manual_seed(s); EngramLM(config, vocab)`` (call
    ``manual_seed`` first on every rank): the constructor runs as usual but its
    ``init_weights`` is deferred until the tables are shards, whose
    :meth:`ShardedTable.reset_parameters` then draws what the full tables would have drawn.
    (The constructor's full tables are ``torch.empty``, never written: address space only.)
    """
    from engramlm.model import EngramLM

    class _Deferred(EngramLM):
        def init_weights(self) -> None:
            """The constructor's call: deferred until the tables are sharded."""

    plan = plan or ParallelPlan()
    if not dist.is_initialized():
        raise RuntimeError("build_model needs torch.distributed initialised (init_process_group)")
    group = group or dist.group.WORLD
    model = _Deferred(config, compressed_vocab, tables=TablePlan())
    model.__class__ = EngramLM
    _shard_tables(model, plan, group, copy_rows=False)
    model.init_weights()
    model.to(device)
    return model, _wrap_dense(model, plan, group)


def all_reduce_expert_counts(model: nn.Module, group: Any = None) -> None:
    """Sum every MoE layer's ``expert_counts`` over ranks, so the loss-free bias update
    (``update_moe_biases``) sees the global batch's loads, as a single process would."""
    for name, buf in model.named_buffers():
        if name.endswith("expert_counts"):
            dist.all_reduce(buf, group=group)


def sharded_tables(model: nn.Module) -> list[ShardedTable]:
    """The :class:`ShardedTable` modules of a parallelized model, in module order."""
    return [m for m in model.modules() if isinstance(m, ShardedTable)]


def table_shards(model: nn.Module) -> list[checkpoint.TableShard]:
    """This rank's rows of every sharded table, named by their place in the model."""
    return [m.shard(n) for n, m in model.named_modules() if isinstance(m, ShardedTable)]


# --- a torchrun launch ----------------------------------------------------------------------
@dataclass
class Launch:
    """This process's place in a ``torchrun`` launch (:func:`launch_from_env`)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we initialised the default process group, so we destroy it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, prints and writes the run's shared files."""
        return self.rank == 0

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling caches, clearing folders), the others after."""
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Each value summed over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t)
        return t.tolist()

    def share(self, batches: Any) -> Iterator[tuple[Batch, bool]]:
        """Batches ``rank``, ``rank + world``, ... of a sized iterable, each with ``True``;
        then repeats of the first batch with ``False`` (not to be counted), so that every rank
        runs the same number of forwards (sharded lookups are collectives)."""
        rounds = -(-len(batches) // self.world)
        first, mine = None, 0
        for i, batch in enumerate(batches):
            first = batch if first is None else first
            if i % self.world == self.rank:
                mine += 1
                yield batch, True
        for _ in range(rounds - mine):
            yield first, False

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def launch_from_env(device: str | torch.device = "cpu", timeout_s: float = 600.0) -> Launch | None:
    """The :class:`Launch` of this process under ``torchrun`` (``WORLD_SIZE`` > 1), the process
    group initialised (gloo; NCCL beside it when ``device`` is CUDA, which becomes
    ``cuda:<LOCAL_RANK>``); ``None`` for a single process. A process group initialised by the
    caller is used as it is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise RuntimeError(
            f"RANK/WORLD_SIZE say {rank}/{world}, the process group {dist.get_rank()}/"
            f"{dist.get_world_size()}"
        )
    return Launch(rank, world, local_rank, device, owns)


class RankBatches:
    """One rank's micro-batches of a training stream shared by ``world`` ranks: of every
    ``world`` consecutive batches, the ``rank``-th, hashed here (only our own).

    Every rank draws every batch's window starts (cheap), so all ranks keep the same stream
    position: the state dict is the source's and any rank's checkpoint resumes all of them.
    """

    def __init__(self, source: TrainBatches, rank: int, world: int, hash_fn: HashFn | None):
        self.source, self.rank, self.world, self.hash_fn = source, rank, world, hash_fn

    def __iter__(self) -> RankBatches:
        return self

    def __next__(self) -> Batch:
        batches = [next(self.source) for _ in range(self.world)]
        mine = batches[self.rank]
        hash_ids = self.hash_fn(mine.input_ids) if self.hash_fn is not None else None
        return Batch(mine.input_ids, mine.targets, hash_ids)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Within the context, backward syncs dense gradients across ranks only if ``enabled``
    (off for all but the last micro-batch of a gradient accumulation: one all-reduce)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


# --- sharded checkpoints --------------------------------------------------------------------
def _full(obj: Any) -> Any:
    """FSDP2 DTensors -> whole tensors (a collective: every rank calls it), recursively."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, Mapping):
        return {k: _full(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_full(v) for v in obj)
    return obj


def _place(value: Tensor, own: Tensor) -> Tensor:
    """A loaded whole tensor -> the layout of ``own`` (a DTensor: this rank's part of it)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(own, DTensor):
        return value
    return distribute_tensor(
        value.to(own.device), own.device_mesh, own.placements, src_data_rank=None
    )


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizers: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    config: Mapping[str, Any],
    tokenizer_fingerprint: str | None = None,
    keep: int = 3,
) -> Path:
    """Every rank: write a sharded checkpoint of ``model`` (the inner, unwrapped model) -> its
    directory. Every rank writes its table rows and their moments into rank 0's staging
    directory; rank 0 writes the dense weights and optimisers (gathered whole from FSDP
    shards), the trainer state (its own RNG and data position: every rank's are the same) and
    the manifest, and commits atomically; a failure on any rank raises on every rank."""
    rank = dist.get_rank()
    model_state = _full(model.state_dict())  # FSDP: collectives on every rank
    dense = {name: _full(o.state_dict()) for name, o in optimizers.items() if name != "tables"}
    box: list[Any] = [None]
    if rank == 0:
        try:
            box = [checkpoint.stage_checkpoint(run_dir, step)]
        except Exception as e:
            box = [checkpoint.CheckpointError(f"rank 0 could not stage step {step}: {e!r}")]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], BaseException):
        raise box[0]
    staging: Path = box[0]
    record, error = None, None
    try:
        record = checkpoint.write_table_shards(staging, rank, table_shards(model))
    except Exception as e:
        error = f"rank {rank} could not write its table shards: {e!r}"
    records: list[Any] = [None] * dist.get_world_size() if rank == 0 else []
    dist.gather_object((record, error), records if rank == 0 else None, dst=0)
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            errors = [e for _, e in records if e]
            if errors:
                raise checkpoint.CheckpointError("; ".join(errors))
            if "tables" in optimizers:  # the moments are in the shard files; steps, groups here
                sd = optimizers["tables"].state_dict()
                steps = {i: {"step": e["step"]} for i, e in sd["state"].items()}
                dense["tables"] = {"state": steps, "param_groups": sd["param_groups"]}
            path = checkpoint.save_checkpoint(
                run_dir,
                step,
                model=model_state,
                optimizers=dense,
                trainer_state=trainer_state,
                config=config,
                tokenizer_fingerprint=tokenizer_fingerprint,
                keep=keep,
                staging=staging,
                table_shards=[r for r, _ in records],
            )
            outcome = [str(path)]
        except Exception as e:
            shutil.rmtree(staging, ignore_errors=True)
            outcome = [checkpoint.CheckpointError(f"sharded checkpoint of step {step}: {e}")]
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return Path(outcome[0])


def load_checkpoint(
    path_or_run_dir: str | Path,
    *,
    model: nn.Module,
    optimizers: Mapping[str, Any],
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Every rank: restore a checkpoint - sharded with any world size, or one process's - into
    ``model`` (the inner, unwrapped model; each sharded table reads only its own rows) and
    ``optimizers`` (``"tables"``: the shards' moments and step come with their rows). Rank 0
    picks the checkpoint (``latest``, else the newest that verifies), so all ranks load the
    same one. Returns the trainer state, as ``engramlm.checkpoint.load_checkpoint``."""
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [str(checkpoint.resolve_checkpoint(path_or_run_dir))]
        except Exception as e:
            box = [e]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], BaseException):
        raise box[0]
    dense = {name: opt for name, opt in optimizers.items() if name != "tables"}
    return checkpoint.load_checkpoint(
        box[0],
        model=model,
        optimizers=dense,
        map_location=map_location,
        table_shards=table_shards(model),
        place=_place,
    )


__all__ = [
    "Launch",
    "ParallelPlan",
    "PeerError",
    "RankBatches",
    "ShardedTable",
    "ShardedTableAdam",
    "all_reduce_expert_counts",
    "build_model",
    "gradient_sync",
    "launch_from_env",
    "load_checkpoint",
    "owner_of",
    "parallelize",
    "save_checkpoint",
    "send_counts",
    "shard_range",
    "shard_size",
    "sharded_tables",
    "table_optimizer",
    "table_shards",
]
