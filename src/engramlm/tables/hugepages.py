"""Back large in-memory tables with transparent huge pages (Linux).

A lookup reads rows at random: with 4 KB pages nearly every row of a multi-GB table is also a
TLB miss, and the page walk adds to the DRAM miss. With 2 MB pages the whole table's mappings
fit the TLB. Measured with ``benchmarks/tiers.py gather`` (4 GB fp32 table, 1M random rows, one
thread, 2026-12-01): 3.2 -> 4.6 GB/s for 128-byte rows, 5.4 -> 7.1 GB/s for 1 KB rows.

Kernels that leave THP to ``madvise`` (the usual default, and this machine's) give huge pages
only to memory advised ``MADV_HUGEPAGE``; torch's CPU allocator advises nothing unless the
process sets ``THP_MEM_ALLOC_ENABLE=1`` before its first allocation, which a library cannot do
for its users. :func:`use_huge_pages` advises one tensor's memory ``MADV_HUGEPAGE`` instead,
before its pages are first touched (tables call it between ``torch.empty`` and their
initialisation), so the faults that fill it map huge pages. Pages touched before the advice
stay small: collapsing them (``MADV_COLLAPSE``) took 8.3 s for 4 GB in one trial here (a
throwaway script, not a kept benchmark) and the gather was no faster after it, so it is not
used. A hint: where the kernel refuses (other OS, THP off, no free 2 MB blocks) the tensor
simply keeps small pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

from torch import Tensor

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def use_huge_pages(tensor: Tensor) -> bool:
    """Advise the whole 2 MB pages inside a CPU tensor's memory to be huge pages when first
    touched (see the module docstring); -> whether the kernel accepted the advice. Values are
    never changed; tensors under 2 MB, on other devices or other systems are left alone."""
    madvise = _madvise()
    nbytes = tensor.untyped_storage().nbytes()
    if madvise is None or tensor.device.type != "cpu" or nbytes < HUGE_PAGE:
        return False
    start = tensor.untyped_storage().data_ptr()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE  # the aligned interior: madvise needs page bounds
    last = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return False
    return madvise(first, last - first, _MADV_HUGEPAGE) == 0


def huge_page_share(tensor: Tensor, smaps: str | None = None) -> float | None:
    """The share of a CPU tensor's memory backed by transparent huge pages now, from
    ``/proc/self/smaps`` (or the text ``smaps``): the ``AnonHugePages`` of the mappings it
    spans, each counted in proportion to the part of the mapping the tensor covers; None where
    there is no such file. Whether :func:`use_huge_pages`'s advice was honoured depends on free
    2 MB blocks when the pages were first touched, so benchmarks report it beside timings."""
    if smaps is None:
        try:
            with open("/proc/self/smaps") as f:
                smaps = f.read()
        except OSError:
            return None
    lines = smaps.splitlines()
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    huge = covered = 0
    lo = hi = 0
    for line in lines:
        if not line.strip():
            continue
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: "lo-hi perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
        elif head == "AnonHugePages:" and lo < end and hi > start:
            overlap = min(hi, end) - max(lo, start)
            covered += overlap
            huge += int(line.split()[1]) * 1024 * overlap // (hi - lo)
    return huge / covered if covered else None
