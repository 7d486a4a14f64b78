"""The paper's experiments in miniature: ``engramlm experiment NAME`` (issue #8).

Each experiment is a module of this package with ``run(ctx: Context) -> dict``; see
:mod:`engramlm.experiments.common` for what they share. Results go to
``runs/<name>/results.json`` and PNG plots beside it; ``docs/results.md`` quotes them.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from engramlm.experiments.common import Context

logger = logging.getLogger(__name__)

# name -> (module, one-line description), in the order of the issue / the paper.
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "allocation": ("allocation", "sparsity allocation: validation loss vs rho (U-curve)"),
    "scaling": ("scaling", "Engram table size vs loss (power law), beside OverEncoding"),
    "ablations": ("ablations", "remove one component at a time: loss deltas"),
    "logitlens": ("logitlens", "per-layer KL to the final distribution, Engram vs MoE"),
    "cka": ("cka", "layer-by-layer CKA between Engram and MoE models"),
    "gates": ("gates", "gate activations over real sentences, as heatmaps"),
    "masking": ("masking", "Engram output zeroed: factual recall vs reading comprehension"),
    "longctx": ("longctx", "multi-query needle-in-a-haystack and variable tracking"),
}


def run_experiment(name: str, **context: Any) -> dict[str, Any]:
    """Run one experiment by name; ``context`` are :class:`Context` fields (scale, smoke, ...).

    Returns the dict written to ``runs/<name>/results.json``.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    module = importlib.import_module(f"engramlm.experiments.{EXPERIMENTS[name][0]}")
    ctx = Context(name=name, **context)
    results = module.run(ctx)
    path = ctx.save_results(results)
    logger.info("%s: results in %s", name, path)
    import json

    return json.loads(Path(path).read_text())


__all__ = ["EXPERIMENTS", "Context", "run_experiment"]
