"""The README's two commands: `make test` needs neither root nor the corpus, and `make demo`
falls back to the standard library's source where the corpus cannot be installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A stand-in for the set-up .venv: `engramlm` records its arguments instead of training."""
    bin = tmp_path / "venv" / "bin"
    bin.mkdir(parents=True)
    (bin / "python").write_text("#!/bin/sh\n")
    engramlm = bin / "engramlm"
    engramlm.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "engramlm-args"}\n')
    engramlm.chmod(0o755)
    (tmp_path / "venv" / ".installed").touch()  # newer than pyproject.toml: nothing to install
    return tmp_path / "venv"


def make(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(
        ["make", "-C", str(ROOT), "--no-print-directory", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_make_test_does_not_install_the_corpus(venv: Path) -> None:
    dry = make("-n", "test", f"VENV={venv}")
    assert dry.returncode == 0, dry.stderr
    commands = dry.stdout.splitlines()
    assert any("pytest" in c for c in commands)
    assert not [c for c in commands if "install_data" in c or "apt-get" in c], commands


@pytest.mark.parametrize(
    ("installs", "pydocs_there", "corpus"),
    [("true", False, "pydocs"), ("false", True, "pydocs"), ("false", False, "stdlib")],
)
def test_make_demo_trains_on_pydocs_or_says_why_not_and_uses_stdlib(
    venv: Path, tmp_path: Path, installs: str, pydocs_there: bool, corpus: str
) -> None:
    pydocs = tmp_path / "pydocs"
    if pydocs_there:
        pydocs.mkdir()
    done = make("demo", f"VENV={venv}", f"INSTALL_DATA={installs}", f"PYDOCS={pydocs}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "engramlm-args").read_text().split() == ["compare", f"--train.data={corpus}"]
    said = "could not be installed" in done.stderr and "standard library" in done.stderr
    assert said == (corpus == "stdlib"), done.stderr
