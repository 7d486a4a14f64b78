"""What a re-run of the experiments changed on the results page (issue 12, item 8).

Compares each experiment's section of ``docs/results.md`` with the same section of an earlier
version of the page (a git revision, or a file): sections that are identical were not re-run;
for the others it lists the verdict before and now, and every table cell whose column reports
an outcome (losses, deltas, KL, accuracies, retention, CKA shifts, gate differences) with its
value before, now and the change. Rows are matched by their label cells, so a row that exists
on one side only is listed as such. The result is a markdown block that ``--write`` puts into
the page, where ``engramlm experiment report`` keeps it (``report.changes_block``).

    .venv/bin/python recipes/results_changes.py --before 12dd8e8 [--write] [--note TEXT]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

from engramlm.experiments import EXPERIMENTS
from engramlm.experiments.report import previous_entries, with_changes_block

# Columns whose cells are outcomes (compared); the others (sizes, counts, settings) are context.
OUTCOME = re.compile(
    r"loss|Δ|KL|acc|retention|NLL|p\(correct\)|a_j - b_j|continuation - word-initial|"
    r"MoE - Engram|Engram - MoE|OE - Engram|^MoE$|^Engram$|Engram, masked|continuation$|"
    r"word-initial$|^other$",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"^[+-]?(\d[\d,]*\.?\d*|\.\d+)")


def number(cell: str) -> float | None:
    """The leading number of a table cell ("4.9380 ± 0.0403" -> 4.938, "81% ± 3%" -> 81.0)."""
    m = _NUMBER.match(cell.strip().replace("−", "-"))
    return float(m.group(0).replace(",", "")) if m else None


def tables(section: str) -> list[tuple[list[str], list[list[str]]]]:
    """The markdown tables of a section: [(header cells, body rows of cells)]."""
    out: list[tuple[list[str], list[list[str]]]] = []
    lines = section.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = _cells(lines[i])
            body = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                body.append(_cells(lines[i]))
                i += 1
            out.append((header, body))
        else:
            i += 1
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def verdict(section: str) -> str:
    """The section's verdict: its last paragraph that opens in bold ("**Verdict:** ...")."""
    paragraphs = [p.strip() for p in section.split("\n\n") if p.strip().startswith("**")]
    return paragraphs[-1] if paragraphs else ""


def cell_changes(before: str, after: str) -> list[tuple[str, str, float | None, float | None]]:
    """[(row label, column, value before, value now)] of the outcome cells that differ."""
    old_tables, new_tables = tables(before), tables(after)
    changes = []
    for t, (header, rows) in enumerate(new_tables):
        old_rows = _by_label(old_tables[t]) if t < len(old_tables) else {}
        new_rows = _by_label((header, rows))
        where = f"table {t + 1}: " if len(new_tables) > 1 else ""  # the same labels recur
        for label, cells in new_rows.items():
            old = old_rows.get(label)
            for col, cell in cells.items():
                if not OUTCOME.search(col) or number(cell) is None:
                    continue
                was = None if old is None else number(old.get(col, ""))
                now = number(cell)
                if was != now:
                    changes.append((where + label, col, was, now))
        for label in old_rows.keys() - new_rows.keys():
            changes.append((where + label, "(row)", None, None))
    return changes


def _by_label(table: tuple[list[str], list[list[str]]]) -> dict[str, dict[str, str]]:
    """Rows keyed by their first cells, as few as make the keys unique ("task / length")."""
    header, rows = table
    width = max((len(r) for r in rows), default=1)
    for k in range(1, width + 1):
        keys = [" / ".join(cells[:k]) for cells in rows]
        if len(set(keys)) == len(keys):
            break
    if k == 1 and header and all(number(cells[0]) is not None for cells in rows):
        keys = [f"{header[0]} {key}" for key in keys]  # "rho (nominal) 0.7", not "0.7"
    return {
        key: dict(zip(header, cells, strict=False)) for key, cells in zip(keys, rows, strict=True)
    }


def report(before_page: str, after_page: str, note: str = "") -> str:
    """The markdown block: per experiment, re-run or not, verdicts and changed outcomes."""
    before, after = previous_entries(before_page), previous_entries(after_page)
    lines = ["## What the re-run changed", ""]
    if note:
        lines += [note.strip(), ""]
    for name in EXPERIMENTS:
        if name not in after:
            lines += [f"- **{name}**: not on the page.", ""]
            continue
        if name not in before:
            lines += [f"- **{name}**: new on the page (nothing to compare).", ""]
            continue
        old_section, new_section = before[name][1], after[name][1]
        if old_section == new_section:
            lines += [
                f"- **{name}**: not re-run yet: its section still shows the earlier numbers.",
                "",
            ]
            continue
        old_verdict, new_verdict = verdict(old_section), verdict(new_section)
        lines.append(f"- **[{name}](#{name})**: re-run.")
        if old_verdict == new_verdict:
            lines.append("  Verdict unchanged.")
        else:
            lines += [f"  - before: {_short(old_verdict)}", f"  - now: {_short(new_verdict)}"]
        changed = cell_changes(old_section, new_section)
        if changed:
            lines += ["", "  | row | column | before | now | change |", "  |---|---|---|---|---|"]
            for label, col, was, now in changed:
                if col == "(row)":
                    lines.append(f"  | {label} | (row gone) | | | |")
                    continue
                delta = "" if was is None or now is None else f"{now - was:+.4g}"
                lines.append(f"  | {label} | {col} | {_fmt(was)} | {_fmt(now)} | {delta} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _short(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rsplit(" ", 1)[0] + " ..."


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--before", help="git revision whose docs/results.md is the baseline")
    source.add_argument("--before-page", help="a file holding the baseline page")
    parser.add_argument("--page", default="docs/results.md")
    parser.add_argument("--note", default="", help="a paragraph put under the heading")
    parser.add_argument("--write", action="store_true", help="put the block into --page")
    args = parser.parse_args()
    page = Path(args.page)
    if args.before_page:
        before = Path(args.before_page).read_text()
    else:
        before = subprocess.run(
            ["git", "show", f"{args.before}:{args.page}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    block = report(before, page.read_text(), args.note)
    print(block)
    if args.write:
        tmp = page.with_suffix(".md.tmp")
        tmp.write_text(with_changes_block(page.read_text(), block))
        os.replace(tmp, page)
        print(f"written into {page}")


if __name__ == "__main__":
    main()
