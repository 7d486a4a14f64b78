"""Recipes that restate a configuration written in code stay equal to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engramlm.cli import load_configs
from engramlm.compare import DEFAULT_ENGRAM, DEFAULT_MOE, DEFAULT_RHO, DEFAULT_TRAIN, build_models

RECIPES = Path(__file__).parent.parent / "recipes"


def test_demo_engram_recipe_is_the_main_jobs_engram_model() -> None:
    model, train = load_configs(str(RECIPES / "demo_engram.toml"), [])
    models = build_models(DEFAULT_MOE, DEFAULT_ENGRAM, DEFAULT_RHO, DEFAULT_MOE.vocab_size)
    assert model == models[f"Engram (rho={DEFAULT_RHO:g})"]
    # The demo's schedule, with the batch split over 2 ranks and checkpoints every evaluation.
    expected = dataclasses.replace(
        DEFAULT_TRAIN, batch_size=8, ckpt_every=100, out_dir="runs/demo_engram"
    )
    assert train == expected
