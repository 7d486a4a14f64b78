"""The README's Python snippets name things engramlm has and call them with arguments that bind.

Running them whole needs a trained run and a Llama, so this checks what goes stale silently: every
``from engramlm... import NAME`` exists, and every call of an imported engramlm callable binds to
its signature (positional count and keyword names).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def _resolve(node: ast.expr, names: dict[str, Any]) -> Any:
    """The engramlm object a call's ``func`` names (``f``, ``Cls.method``, ``mod.f``), or None."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, names)
        return getattr(owner, node.attr, None) if owner is not None else None
    return None


def test_readme_has_python_snippets() -> None:
    assert len(_snippets()) >= 2


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_imports_exist_and_calls_bind(index: int) -> None:
    tree = ast.parse(_snippets()[index])
    names: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engramlm"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README imports missing {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("engramlm"):
                    module = importlib.import_module(alias.name)
                    if alias.asname:
                        names[alias.asname] = module
                    else:  # `import engramlm.hf` binds `engramlm`
                        names["engramlm"] = importlib.import_module("engramlm")
    checked = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = _resolve(node.func, names)
        if target is None or not callable(target) or inspect.ismodule(target):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords
        ):
            continue
        signature = inspect.signature(target)
        args = [object()] * len(node.args)
        kwargs = {k.arg: object() for k in node.keywords}
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            raise AssertionError(f"README: {ast.unparse(node)} does not bind: {err}") from None
        checked += 1
    assert checked, "no engramlm call found in the snippet"


def test_readme_seed_spread_is_the_allocation_experiments() -> None:
    """The demo's "what to expect" table quotes the stored three-seed results, to the digit: the
    MoE is rho = 1, and the demo's Engram (rho = 0.75) is the model the sweep trains at 0.7."""
    import json
    import statistics

    from engramlm.compare import DEFAULT_ENGRAM, DEFAULT_MOE, DEFAULT_RHO, build_models
    from engramlm.model import allocate

    results = README.parent / "docs/img/results/allocation/results.json"
    points = {p["rho"]: p["val_loss"] for p in json.loads(results.read_text())["results"]["points"]}
    demo = build_models(DEFAULT_MOE, DEFAULT_ENGRAM, DEFAULT_RHO, 8192)
    moe = demo["MoE (rho=1)"]
    assert demo[f"Engram (rho={DEFAULT_RHO:g})"] == allocate(moe, 0.7, engram=DEFAULT_ENGRAM)
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in README.read_text().splitlines()
        if line.startswith(("| MoE (rho=1) | 4.", "| Engram (rho=0.75, ", "| Engram - MoE |"))
    }
    gaps = [e - m for e, m in zip(points[0.7], points[1.0], strict=True)]
    for name, losses, digits in [
        ("MoE (rho=1)", points[1.0], 4),
        ("Engram (rho=0.75, 0.73 achieved)", points[0.7], 4),
        ("Engram - MoE", gaps, 3),
    ]:
        spread = f"{statistics.mean(losses):.3f} ± {statistics.stdev(losses):.3f}"
        assert rows[name] == [f"{v:.{digits}f}" for v in losses] + [spread], name
