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
