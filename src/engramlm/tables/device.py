"""The in-memory table: one ``nn.Parameter`` on the model's device (SPEC §2.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engramlm.tables.base import TABLE_INIT_STD


class DeviceTable(nn.Module):
    """All heads of one Engram layer in one contiguous [num_rows, dim] parameter.

    Initialised N(0, ``TABLE_INIT_STD``^2) (the paper is silent; see ``tables.base``). With
    ``sparse_grad=True`` the gradient is a sparse COO tensor holding only the looked-up rows,
    which is what ``torch.optim.SparseAdam`` consumes: only addressed rows and their Adam
    moments are touched in a step.
    """

    def __init__(self, num_rows: int, dim: int, *, sparse_grad: bool = False) -> None:
        super().__init__()
        if num_rows < 1 or dim < 1:
            raise ValueError(f"table shape must be positive, got num_rows={num_rows}, dim={dim}")
        self.num_rows = num_rows
        self.dim = dim
        self.sparse_grad = sparse_grad
        self.weight = nn.Parameter(torch.empty(num_rows, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=TABLE_INIT_STD)

    def lookup(self, rows: Tensor) -> Tensor:  # [*] -> [*, dim]
        if self.sparse_grad:
            return _sparse_lookup(rows, self.weight)
        return F.embedding(rows, self.weight)

    def prefetch(self, rows: Tensor) -> None:
        """Rows are already resident: nothing to do."""

    def warm(self, rows: Tensor) -> None:
        """Rows are already resident: nothing to do."""

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, sparse_grad={self.sparse_grad}"


@torch.compiler.disable
def _sparse_lookup(rows: Tensor, weight: Tensor) -> Tensor:
    """F.embedding with a sparse gradient, always eager: inductor cannot compile a backward that
    produces a sparse tensor ("Cannot access storage of SparseTensorImpl"), so under
    ``torch.compile`` the graph breaks around the lookup and the rest still compiles."""
    return F.embedding(rows, weight, sparse=True)
