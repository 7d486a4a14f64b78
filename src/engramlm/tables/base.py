"""The storage seam: Engram asks a table for rows; where the rows live is the backend's business.

Every backend (in-memory, host-offloaded, disk, sharded) implements :class:`Table` and passes
the same test suite; model code only ever calls ``lookup``, ``prefetch`` and ``warm``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

# Rows start N(0, 0.02^2), like the backbone's token embedding. The demo's nn.Embedding default
# is N(0, 1); on pydocs (docs/design.md) unit-variance rows trained markedly worse, because the
# Adam-sized updates (~lr) then move a row only a little relative to its random start.
TABLE_INIT_STD = 0.02


@runtime_checkable
class Table(Protocol):
    """A [num_rows, dim] embedding table addressed by global row ids."""

    num_rows: int
    dim: int

    def lookup(self, rows: Tensor) -> Tensor:
        """[*] int64 global rows -> [*, dim] vectors, differentiable w.r.t. the table."""
        ...

    def prefetch(self, rows: Tensor) -> None:
        """A hint that ``rows`` will be looked up soon; doing nothing is correct."""
        ...

    def warm(self, rows: Tensor) -> None:
        """An earlier hint (the data loader's, a batch or more ahead) that ``rows`` will be
        looked up: slow storage may start reading them; doing nothing is correct."""
        ...
