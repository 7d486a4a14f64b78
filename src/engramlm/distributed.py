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
(an :class:`~engramlm.tables.OffloadedTable` over host memory) for :class:`TableAdam` -
``torch.optim.SparseAdam``'s arithmetic. Dividing by ``world`` matches DDP: each rank's loss is
a mean over its local batch, so averaging over ranks gives the gradient of the global-batch mean.

Collectives: ``all_to_all_single`` (gloo has it on CPU, checked with torch 2.13). Backends
without it fall back to pairwise ``isend``/``irecv`` with every peer (``exchange="p2p"``;
``"auto"`` probes the backend once in :func:`parallelize`). Table traffic runs on its own
process group, so it never interleaves with DDP's gradient all-reduces on the default group.
The exchanged tensors are CPU tensors (the shards live in host memory): gloo only, for now;
NCCL would need them staged on the GPU.

Failures: every exchange is bounded by the process group's timeout; a dead or stalled peer
raises :class:`PeerError` naming the table, the collective and the rank, instead of hanging.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engramlm.tables import MemoryStore, OffloadedTable, TableAdam
from engramlm.tables.plan import read_rows

logger = logging.getLogger(__name__)

DenseStrategy = Literal["ddp", "fsdp"]
Exchange = Literal["auto", "all_to_all", "p2p"]


@dataclass(frozen=True)
class ParallelPlan:
    """How :func:`parallelize` distributes a model.

    ``dense``: ``"ddp"`` (DistributedDataParallel, replicated dense weights) or ``"fsdp"``
    (FSDP2 ``fully_shard`` per block and at the root). ``exchange``: the table collective,
    ``"auto"`` = ``all_to_all`` when the backend has it, else ``"p2p"``. ``timeout_s`` bounds
    each table exchange (the table process group's timeout).
    """

    dense: DenseStrategy = "ddp"
    exchange: Exchange = "auto"
    timeout_s: float = 600.0

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

    def __call__(
        self, x: Tensor, send: list[int], recv: list[int], what: str
    ) -> Tensor:  # [sum(send), *] -> [sum(recv), *]
        out = x.new_empty(sum(recv), *x.shape[1:])
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

    This rank's shard is ``local``, an :class:`~engramlm.tables.OffloadedTable` over host
    memory holding global rows ``[start, stop)`` (see the module docstring for the rule and the
    exchange). Train the shards with ``TableAdam([t.local for t in tables])``
    (:func:`table_optimizer`). Every rank must look up every sharded table the same number of
    times, in the same order, and run backward for each (lockstep data parallelism).
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        group: Any = None,
        exchange: Literal["all_to_all", "p2p"] = "all_to_all",
        name: str = "table",
    ) -> None:
        super().__init__()
        self.num_rows, self.dim, self.name = num_rows, dim, name
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.start, self.stop = shard_range(self.rank, num_rows, self.world)
        # An empty shard still gets one row, never addressed: stores must be non-empty.
        rows = max(1, self.stop - self.start)
        self.local = OffloadedTable(*(MemoryStore(rows, dim) for _ in range(3)), device="cpu")
        self._exchange = _Exchanger(group, exchange, f"sharded table {name!r}")
        self._anchor = torch.zeros(0, device="cpu", requires_grad=True)
        self.ids_requested = 0  # ids passed to lookup, summed over lookups
        self.ids_sent = 0  # distinct ids actually exchanged after dedup

    @property
    def dedup_saving(self) -> float:
        """Fraction of id (and row, and gradient) traffic saved by deduplication."""
        return 1.0 - self.ids_sent / self.ids_requested if self.ids_requested else 0.0

    def prefetch(self, rows: Tensor) -> None:
        """Not used: the exchange is a collective, issued by ``lookup`` on every rank."""

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
        if route.local.numel():
            self.local.pending.append((route.local, grads))

    @torch.no_grad()
    def load_from(self, table: Any) -> None:
        """Copy the rows this rank owns from a full table of any backend (initialisation)."""
        if self.stop > self.start:
            rows = torch.arange(self.start, self.stop)
            self.local.write_rows(rows - self.start, read_rows(table, rows))

    def extra_repr(self) -> str:
        return (
            f"num_rows={self.num_rows}, dim={self.dim}, rank={self.rank}/{self.world}, "
            f"rows=[{self.start}, {self.stop}), exchange={self._exchange.exchange}"
        )


def table_optimizer(
    tables: list[ShardedTable],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> TableAdam:
    """Lazy Adam (SparseAdam's arithmetic) over each rank's shards; defaults as in ``train``."""
    return TableAdam([t.local for t in tables], lr=lr, betas=betas, eps=eps)


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


def parallelize(model: nn.Module, plan: ParallelPlan | None = None, group: Any = None) -> nn.Module:
    """Shard every Engram table of ``model`` across ``group``'s ranks and wrap the dense part.

    Every rank must call this on a model built identically (same config, same seed): each
    rank keeps, from its copy of every table, the rows it owns, so the sharded model starts
    with the single-process model's weights. Returns the wrapped model (DDP module, or the
    model itself with FSDP2); reach the tables through ``engram_tables()`` of the inner model.
    Dense gradients are averaged over ranks, as are the table row gradients.
    """
    plan = plan or ParallelPlan()
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed initialised (init_process_group)")
    group = group or dist.group.WORLD
    table_group = dist.new_group(
        dist.get_process_group_ranks(group), timeout=timedelta(seconds=plan.timeout_s)
    )
    exchange = _resolve_exchange(plan, table_group)
    for block in getattr(model, "layers", []):
        engram = getattr(block, "engram", None)
        if engram is None:
            continue
        full = engram.table
        sharded = ShardedTable(
            full.num_rows,
            full.dim,
            group=table_group,
            exchange=exchange,
            name=f"engram_layer{block.layer_id}",
        )
        sharded.load_from(full)
        engram.table = sharded  # the full copy is dropped here
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


def all_reduce_expert_counts(model: nn.Module, group: Any = None) -> None:
    """Sum every MoE layer's ``expert_counts`` over ranks, so the loss-free bias update
    (``update_moe_biases``) sees the global batch's loads, as a single process would."""
    for name, buf in model.named_buffers():
        if name.endswith("expert_counts"):
            dist.all_reduce(buf, group=group)


def sharded_tables(model: nn.Module) -> list[ShardedTable]:
    """The :class:`ShardedTable` modules of a parallelized model, in module order."""
    return [m for m in model.modules() if isinstance(m, ShardedTable)]


__all__ = [
    "ParallelPlan",
    "PeerError",
    "ShardedTable",
    "all_reduce_expert_counts",
    "owner_of",
    "parallelize",
    "send_counts",
    "shard_range",
    "shard_size",
    "sharded_tables",
    "table_optimizer",
]
