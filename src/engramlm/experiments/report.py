"""``docs/results.md``: every experiment's section, assembled from its ``results.json``.

Each experiment module renders its own section (``report(doc) -> str``: command, machine, wall
time, measured numbers beside the paper's, a verdict computed from the numbers). This module
puts them in the issue's order under an index, copies the plots and the ``results.json`` to
``docs/img/results/<name>/`` and marks experiments that have not been run. An experiment with no
results under ``out_root`` (another checkout ran it: ``runs/`` is not committed) keeps its section
and index row from the existing page, so rerunning one experiment never erases the others.
Smoke-size results are never written to the page.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from pathlib import Path

from engramlm.experiments import EXPERIMENTS

HEADER = """# Results: the paper's experiments in miniature

Every number on this page was written by `engramlm experiment NAME` (or `make reproduce`, which
runs them all) from `runs/NAME/results.json`, copied beside the plots and linked from the index
(the raw file of a result written before copies were kept is not there). Each section quotes its
command, the machine and the wall time. The models are tiny (4 layers, width 256, ~16M
parameters, minutes of CPU training) against the paper's 27B-parameter models trained on 262B
tokens, so only the *direction and shape* of each finding can be compared, and single runs of this
size move by up to ~0.16 nats with the initial draws alone (docs/design.md): read the spreads
over seeds before reading the differences. A run reproduces bitwise only with the same torch
thread count (`OMP_NUM_THREADS`, in the machine line of results written since it is recorded):
another count sums in another order, and training amplifies the last bits. Verdicts are computed
from the numbers by each experiment's `report()`, not written by hand. Wall times are as
measured, whatever else ran on the machine (the sections say when experiments ran side by side);
trained models are shared between experiments (`runs/_models/`), so an experiment that reuses
another's models takes only its own analysis time.
"""


def load_results(out_root: str | Path, name: str) -> dict | None:
    """A full-size ``results.json`` of ``name`` under ``out_root``, or None."""
    path = Path(out_root) / name / "results.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return None if doc.get("smoke") else doc


_ANCHOR = re.compile(r'^<a id="([a-z0-9_]+)"></a>$', re.MULTILINE)

# A block of the page that rendering keeps as it is, after the index: what a re-run changed,
# written by ``recipes/results_changes.py`` from two versions of the page.
CHANGES_START, CHANGES_END = "<!-- changes -->", "<!-- /changes -->"
_CHANGES = re.compile(re.escape(CHANGES_START) + ".*?" + re.escape(CHANGES_END), re.DOTALL)


def changes_block(page_text: str) -> str | None:
    """The page's kept block (markers included), or None."""
    m = _CHANGES.search(page_text)
    return m.group(0) if m else None


def with_changes_block(page_text: str, block: str) -> str:
    """``page_text`` with its kept block replaced by ``block`` (markers added), or the block
    inserted after the index table when the page has none."""
    block = f"{CHANGES_START}\n{block.strip()}\n{CHANGES_END}"
    if _CHANGES.search(page_text):
        return _CHANGES.sub(lambda _: block, page_text, count=1)
    first = _ANCHOR.search(page_text)
    at = first.start() if first else len(page_text)
    return page_text[:at] + block + "\n\n" + page_text[at:]


def previous_entries(page_text: str) -> dict[str, tuple[str, str]]:
    """``{name: (index row, section)}`` of the experiments a rendered page reports results for."""
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\| \[([a-z0-9_]+)\]\(#\1\) \|.*$", page_text, re.MULTILINE)
    }
    marks = list(_ANCHOR.finditer(page_text))
    entries = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(page_text)
        name = m.group(1)
        if name in rows:  # "not run yet" sections have a plain (unlinked) index row
            entries[name] = (rows[name], page_text[m.start() : end].strip() + "\n")
    return entries


def render(
    out_root: str | Path = "runs",
    img_dir: str | Path = "docs/img/results",
    previous: str | None = None,
) -> str:
    """The markdown page; copies each experiment's PNGs and results.json into ``img_dir/<name>/``.

    ``previous`` is the text of the page being replaced: experiments without results under
    ``out_root`` keep their entries from it.
    """
    out_root, img_dir = Path(out_root), Path(img_dir)
    kept = previous_entries(previous) if previous else {}
    index = ["| experiment | what it measures | wall time | plots |", "|---|---|---|---|"]
    sections = []
    for name, (module_name, what) in EXPERIMENTS.items():
        doc = load_results(out_root, name)
        anchor = f"#{name}"
        if doc is None and name in kept:
            row, section = kept[name]
            index.append(row)
            sections.append(section)
            continue
        if doc is None:
            index.append(f"| {name} | {what} | not run yet | |")
            sections.append(
                f'<a id="{name}"></a>\n\n## {name}\n\nNot run yet at full size: '
                f"`engramlm experiment {name}`.\n"
            )
            continue
        (img_dir / name).mkdir(parents=True, exist_ok=True)
        plots = []
        for path in [*sorted((out_root / name).glob("*.png")), out_root / name / "results.json"]:
            shutil.copyfile(path, img_dir / name / path.name)
            label = path.stem if path.suffix == ".png" else path.name
            plots.append(f"[{label}](img/results/{name}/{path.name})")
        module = importlib.import_module(f"engramlm.experiments.{module_name}")
        minutes = doc.get("wall_seconds", 0.0) / 60
        index.append(f"| [{name}]({anchor}) | {what} | {minutes:.1f} min | {', '.join(plots)} |")
        sections.append(f'<a id="{name}"></a>\n\n' + module.report(doc).strip() + "\n")
    kept_block = changes_block(previous) if previous else None
    return "\n".join([HEADER, *index, "", *([kept_block, ""] if kept_block else []), *sections])


def write_page(out_root: str | Path = "runs", page: str | Path = "docs/results.md") -> Path:
    """Render and atomically write the results page (plots next to it under img/results/)."""
    page = Path(page)
    previous = page.read_text() if page.exists() else None
    text = render(out_root, page.parent / "img" / "results", previous)
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, page)
    return page
