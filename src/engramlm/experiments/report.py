"""``docs/results.md``: every experiment's section, assembled from its ``results.json``.

Each experiment module renders its own section (``report(doc) -> str``: command, machine, wall
time, measured numbers beside the paper's, a verdict computed from the numbers). This module
puts them in the issue's order under an index, copies the plots to ``docs/img/results/<name>/``
and marks experiments that have not been run. Smoke-size results are never written to the page.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

from engramlm.experiments import EXPERIMENTS

HEADER = """# Results: the paper's experiments in miniature

Every number on this page was written by `engramlm experiment NAME` (or `make reproduce`, which
runs them all) from `runs/NAME/results.json`; each section quotes its command, the machine and the
wall time. The models are tiny (4 layers, width 256, ~16M parameters, minutes of CPU training)
against the paper's 27B-parameter models trained on 262B tokens, so only the *direction and shape*
of each finding can be compared, and single runs of this size move by up to ~0.16 nats with the
initial draws alone (docs/design.md): read the spreads over seeds before reading the differences.
Verdicts are computed from the numbers by each experiment's `report()`, not written by hand.
Wall times are as measured, whatever else ran on the machine (the sections say when experiments
ran side by side); trained models are shared between experiments (`runs/_models/`), so an
experiment that reuses another's models takes only its own analysis time.
"""


def load_results(out_root: str | Path, name: str) -> dict | None:
    """A full-size ``results.json`` of ``name`` under ``out_root``, or None."""
    path = Path(out_root) / name / "results.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return None if doc.get("smoke") else doc


def render(out_root: str | Path = "runs", img_dir: str | Path = "docs/img/results") -> str:
    """The markdown page; copies each experiment's PNGs into ``img_dir/<name>/``."""
    out_root, img_dir = Path(out_root), Path(img_dir)
    index = ["| experiment | what it measures | wall time | plots |", "|---|---|---|---|"]
    sections = []
    for name, (module_name, what) in EXPERIMENTS.items():
        doc = load_results(out_root, name)
        anchor = f"#{name}"
        if doc is None:
            index.append(f"| {name} | {what} | not run yet | |")
            sections.append(
                f'<a id="{name}"></a>\n\n## {name}\n\nNot run yet at full size: '
                f"`engramlm experiment {name}`.\n"
            )
            continue
        plots = []
        for png in sorted((out_root / name).glob("*.png")):
            dest = img_dir / name / png.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, dest)
            plots.append(f"[{png.stem}](img/results/{name}/{png.name})")
        module = importlib.import_module(f"engramlm.experiments.{module_name}")
        minutes = doc.get("wall_seconds", 0.0) / 60
        index.append(f"| [{name}]({anchor}) | {what} | {minutes:.1f} min | {', '.join(plots)} |")
        sections.append(f'<a id="{name}"></a>\n\n' + module.report(doc).strip() + "\n")
    return "\n".join([HEADER, *index, "", *sections])


def write_page(out_root: str | Path = "runs", page: str | Path = "docs/results.md") -> Path:
    """Render and atomically write the results page (plots next to it under img/results/)."""
    page = Path(page)
    text = render(out_root, page.parent / "img" / "results")
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, page)
    return page
