"""The benchmark scripts' shared helpers that are not timings (no timed tests here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_top_level_ops_counts_what_python_dispatches_not_what_ops_call_inside() -> None:
    x, w = torch.ones(2, 3), torch.ones(4, 3)

    def step() -> torch.Tensor:
        y = F.linear(x, w)  # calls t and addmm/mm inside: not counted
        return (y + 1).mul(2).mul(3).sum()

    counts = _common().top_level_ops(step)
    assert counts == {"aten::linear": 1, "aten::add": 1, "aten::mul": 2, "aten::sum": 1}
