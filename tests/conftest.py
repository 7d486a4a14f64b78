"""Shared fixtures: tiny, seeded configurations; real text only (no network).

The real text is the standard library's own source (the ``stdlib`` corpus: modules with their
docstrings and comments), present wherever Python is: the suite needs neither root nor the
Debian corpora (``make data``). Only the tests of those corpora themselves skip without them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engramlm import EngramConfig
from engramlm.data import NAMED_CORPORA

FIXTURES = Path(__file__).parent / "fixtures"
STDLIB = NAMED_CORPORA["stdlib"].root


def stdlib_page(name: str) -> Path:
    """The source file of standard-library module ``name`` (``json`` -> json/__init__.py)."""
    for path in (STDLIB / f"{name}.py", STDLIB / name / "__init__.py"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no module {name!r} under {STDLIB}")


def copy_pages(names: tuple[str, ...], folder: Path) -> Path:
    """The sources of modules ``names`` as ``NAME.txt`` files in ``folder`` (a text corpus)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(stdlib_page(name), folder / f"{name}.txt")
    return folder


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


def stdlib_files() -> list[Path]:
    """Real text files with distinct names: the standard library's top-level modules over 2 kB
    (over 100 of them)."""
    return sorted(p for p in STDLIB.glob("*.py") if p.stat().st_size > 2048)


@pytest.fixture
def text_files() -> list[Path]:
    return stdlib_files()
