"""Fused CPU kernels for decoding, built from ``csrc/fused_decode.cpp`` on first use.

A KV-cached decode step works on a few positions, so its time is mostly the fixed cost of each
operator it dispatches, and Engram's step was ~90 small operators (hashing the new token, the
lookup, the gate's reductions, the conv taps): as many as the whole backbone's blocks at 4
layers. Two C++ functions of the extension module that :func:`fused_ops` returns do that work
in one call each: ``hash_step`` (every Engram layer's rows of the new tokens and the next
n-gram prefix) and ``engram_step`` (one layer: gather, key/value projection, gates, short conv,
optionally the residual add). :class:`~engramlm.model.EngramLM` calls them while decoding with a
:class:`~engramlm.model.DecodeCache`, and :class:`~engramlm.engram.Engram` for any short
inference forward, on the CPU in float32; everywhere else (GPU, other dtypes, autograd,
autocast, ``torch.compile``, long sequences) the PyTorch operators run, as before.

The extension is compiled once per machine and torch version with
``torch.utils.cpp_extension`` (~25 s with g++ and ninja; cached under
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). Without a compiler the
build fails, a warning says why, and decoding runs on PyTorch operators, only slower. Set
``ENGRAMLM_FUSED=0`` to never build or use it (or :func:`set_enabled` / :func:`enabled`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).parent / "csrc" / "fused_decode.cpp"
NAME = "engramlm_fused_decode"  # the extension's name: its build folder and library
ENV = "ENGRAMLM_FUSED"

_log = logging.getLogger(__name__)
_lock = threading.Lock()
# "ops": the extension module once built (and enabled); read first, on every decode step.
_state: dict[str, Any] = {"ops": None, "tried": False, "error": None, "enabled": None}


def fused_ops() -> Any | None:
    """The extension module with the fused kernels, building it on the first call; ``None``
    when disabled (``ENGRAMLM_FUSED=0``, read on the first call, or :func:`set_enabled`) or
    when the build failed (warned once, with why)."""
    ops = _state["ops"]
    if ops is not None or _state["tried"]:
        return ops
    with _lock:
        if not _state["tried"]:
            if _state["enabled"] is None:
                _state["enabled"] = os.environ.get(ENV, "1").strip().lower() not in _OFF
            if _state["enabled"]:
                _state["ops"] = _build()
            _state["tried"] = True
    return _state["ops"]


_OFF = ("0", "false", "no", "off")


def set_enabled(enabled: bool) -> None:
    """Use the fused kernels (building them when next needed) or not, overriding
    ``ENGRAMLM_FUSED``; for comparing both paths in one process."""
    with _lock:
        _state.update(enabled=enabled, tried=False, ops=None)


@contextlib.contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """``with kernels.enabled(False):`` runs the block on PyTorch operators only."""
    before = _state["enabled"]
    set_enabled(flag)
    try:
        yield
    finally:
        with _lock:
            _state.update(enabled=before, tried=False, ops=None)


def build_error() -> str | None:
    """Why the last build failed, or ``None``."""
    return _state["error"]


def _build() -> Any | None:
    """Compile (or find compiled) and import the extension; ``None`` and a warning on failure."""
    try:
        from torch.utils.cpp_extension import load

        if not _built():
            _log.warning(
                "engramlm: compiling the fused decode kernels (once per machine and torch "
                "version, ~25 s; %s=0 skips them)",
                ENV,
            )
        return load(name=NAME, sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a read-only cache: fall back
        _state["error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"engramlm: could not build the fused decode kernels ({_state['error']}); decoding "
            f"runs on PyTorch operators, correct but slower. Install g++ and ninja, or set "
            f"{ENV}=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _built() -> bool:
    """Whether a compiled library is already in the build folder (so loading takes ~1 s, not a
    compile); True when that cannot be told (the notice it gates is only a courtesy)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = Path(_get_build_directory(NAME, verbose=False))
    except Exception:  # a private helper of torch's: gone in some version, say nothing
        return True
    return any(folder.glob(f"{NAME}*.so")) or any(folder.glob(f"{NAME}*.pyd"))


class FusedEngram:
    """One Engram layer's forward as one call of ``engram_step``, its constant arguments
    (weights, eps, gate form, conv shape) bound once: what a decode step calls.

    Built by :meth:`engramlm.engram.Engram.fused_call` from the module as it is then; it holds
    the module's parameter tensors, so in-place updates show, but a parameter or table
    *replaced* afterwards does not: build a new one (a :class:`~engramlm.model.DecodeCache`
    builds its own at the first step of each generation). ``lookup`` is the table's own lookup
    for tables the kernel cannot read (host, disk, fp8); ``None`` when it gathers the rows
    itself from ``consts``' table.
    """

    __slots__ = ("op", "lookup", "consts")

    def __init__(self, op: Any, lookup: Any | None, consts: tuple[Any, ...]) -> None:
        self.op, self.lookup, self.consts = op, lookup, consts

    def __call__(
        self,
        hidden: torch.Tensor,
        hash_ids: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        residual: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T, M, D] float32, [B, T, H]) -> (Y, or hidden + Y with ``residual``; state)."""
        memory = None if self.lookup is None else self.lookup(hash_ids).to(torch.float32)
        return self.op(hidden, hash_ids, conv_state, mask, residual, memory, *self.consts)
