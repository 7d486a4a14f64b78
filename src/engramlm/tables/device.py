"""The in-memory table: one ``nn.Parameter`` on the model's device (SPEC §2.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engramlm.tables import fp8
from engramlm.tables.base import TABLE_INIT_STD
from engramlm.tables.hugepages import use_huge_pages


class DeviceTable(nn.Module):
    """All heads of one Engram layer in one contiguous [num_rows, dim] parameter.

    Initialised N(0, ``TABLE_INIT_STD``^2) (the paper is silent; see ``tables.base``). With
    ``sparse_grad=True`` the gradient is a sparse COO tensor holding only the looked-up rows,
    which is what ``torch.optim.SparseAdam`` consumes: only addressed rows and their Adam
    moments are touched in a step.

    ``dtype=torch.float8_e4m3fn`` keeps the rows as fp8 with E8M0 scales (``tables.fp8``): a
    read-only buffer ``packed`` [num_rows, dim + dim/32] uint8, zero until a checkpoint's rows
    are written into it, dequantised to float32 on lookup (DeepSeek-V4.1's tables).
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        sparse_grad: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if num_rows < 1 or dim < 1:
            raise ValueError(f"table shape must be positive, got num_rows={num_rows}, dim={dim}")
        if dtype not in (torch.float32, fp8.FP8):
            raise ValueError(f"DeviceTable stores float32 or float8_e4m3fn rows, got {dtype}")
        self.num_rows = num_rows
        self.dim = dim
        self.dtype = dtype
        self.sparse_grad = sparse_grad
        if dtype == fp8.FP8:
            packed = torch.empty(num_rows, fp8.packed_width(dim), dtype=torch.uint8)
            use_huge_pages(packed)  # before the zeros touch its pages
            self.register_buffer("packed", packed.zero_())
            return
        self.weight = nn.Parameter(torch.empty(num_rows, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.dtype == fp8.FP8:
            raise TypeError("an fp8 table is read-only: its rows come from a checkpoint")
        # Here, not only in __init__: a model built on "meta" gets new, untouched storage from
        # to_empty() and then initialises its tables; advised first, they fault in huge pages.
        use_huge_pages(self.weight)
        nn.init.normal_(self.weight, std=TABLE_INIT_STD)

    def lookup(self, rows: Tensor) -> Tensor:  # [*] -> [*, dim]
        if self.dtype == fp8.FP8:
            return fp8.dequantize_rows(self.packed[rows], self.dim)
        if self.sparse_grad:
            return _sparse_lookup(rows, self.weight)
        return F.embedding(rows, self.weight)

    def prefetch(self, rows: Tensor) -> None:
        """Rows are already resident: nothing to do."""

    def warm(self, rows: Tensor) -> None:
        """Rows are already resident: nothing to do."""

    def extra_repr(self) -> str:
        return (
            f"num_rows={self.num_rows}, dim={self.dim}, dtype={self.dtype}, "
            f"sparse_grad={self.sparse_grad}"
        )


@torch.compiler.disable
def _sparse_lookup(rows: Tensor, weight: Tensor) -> Tensor:
    """F.embedding with a sparse gradient, always eager: inductor cannot compile a backward that
    produces a sparse tensor ("Cannot access storage of SparseTensorImpl"), so under
    ``torch.compile`` the graph breaks around the lookup and the rest still compiles."""
    return F.embedding(rows, weight, sparse=True)
