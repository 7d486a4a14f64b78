"""Shared fixtures: tiny, seeded configurations; real text only (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engramlm import EngramConfig

FIXTURES = Path(__file__).parent / "fixtures"
PYDOCS = Path("/usr/share/doc/python3.11/html/_sources")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def hash_vectors() -> list[dict]:
    """The conformance cases of SPEC §2.3 (a copy of shared/fixtures/engram_hash_vectors.json)."""
    return json.loads((FIXTURES / "engram_hash_vectors.json").read_text())["cases"]


@pytest.fixture
def tiny_engram() -> EngramConfig:
    return EngramConfig.preset("tiny")


@pytest.fixture
def pydocs_files() -> list[Path]:
    files = sorted(PYDOCS.rglob("*.rst.txt"))
    if not files:
        pytest.skip("python3.11-doc is not installed: run `make data`")
    return files
