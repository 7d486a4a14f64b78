"""The allocation and scaling experiments at smoke size: outputs, finite numbers, reports, and
the properties that hold at any size (fixed P_tot across rho, equal memory for Engram and
Over-Encoding, a trained run reloads to the same loss), plus verdicts computed from numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from engramlm.experiments import allocation, run_experiment, scaling
from engramlm.experiments.common import Context, check_finite
from engramlm.train import evaluate


@pytest.fixture(scope="module")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def allocation_doc(out_root: Path) -> dict[str, Any]:
    return run_experiment("allocation", out_root=out_root, smoke=True, progress=False)


@pytest.fixture(scope="module")
def scaling_doc(out_root: Path) -> dict[str, Any]:
    return run_experiment("scaling", out_root=out_root, smoke=True, progress=False)


@pytest.mark.parametrize("name", ["allocation", "scaling"])
def test_smoke_run_writes_finite_results_plot_and_report(
    name: str, out_root: Path, request: pytest.FixtureRequest
) -> None:
    doc = request.getfixturevalue(f"{name}_doc")
    assert json.loads((out_root / name / "results.json").read_text()) == doc
    check_finite(doc["results"])
    assert [p.stat().st_size > 0 for p in (out_root / name).glob("*.png")] == [True]
    text = {"allocation": allocation, "scaling": scaling}[name].report(doc)
    assert text.startswith("## ") and f"`engramlm experiment {name}`" in text
    assert "**Verdict:** " in text and "img/results/" in text


def test_allocation_holds_total_params_while_moving_experts_to_engram(
    allocation_doc: dict[str, Any],
) -> None:
    points = sorted(allocation_doc["results"]["points"], key=lambda p: -p["rho"])
    pure = points[0]
    assert pure["rho"] == 1.0 and pure["engram_table_params"] == 0
    for p in points[1:]:
        assert abs(p["non_embedding_params"] / pure["non_embedding_params"] - 1) < 0.01
    experts = [p["num_experts"] for p in points]
    assert experts == sorted(experts, reverse=True) and len(set(experts)) == len(experts)
    achieved = [p["rho_achieved"] for p in points]
    assert achieved == sorted(achieved, reverse=True)


def test_scaling_gives_both_memories_equal_tables_spanning_30x(
    scaling_doc: dict[str, Any],
) -> None:
    comparison = scaling_doc["results"]["comparison"]
    assert len(comparison) >= 4 and all(c["equal_table_params"] for c in comparison)
    params = [c["table_params"] for c in comparison]
    assert params == sorted(params) and params[-1] / params[0] >= 30


def test_a_trained_overencoding_run_reloads_to_its_validation_loss(
    scaling_doc: dict[str, Any], out_root: Path
) -> None:
    ctx = Context(name="scaling", out_root=out_root, smoke=True, progress=False)
    row = next(r for r in scaling_doc["results"]["rows"] if r["kind"] == "overencoding")
    model = ctx.load(f"overencoding_{row['per_head_size']}_seed0")
    assert model.overencoding is not None
    from engramlm.data import ValBatches

    cfg = ctx.train_config()
    batches = ValBatches(ctx.corpus.val, cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches)
    loss = evaluate(model, batches, cfg, model.lm_head.weight.device)
    assert math.isclose(loss, row["val_loss"][0], rel_tol=1e-6)


def test_allocation_verdict_is_computed_from_the_numbers() -> None:
    def points(losses: dict[float, float]) -> list[dict[str, Any]]:
        return [
            {
                "rho": r,
                "rho_achieved": r,
                "val_loss_mean": v,
                "val_loss_std": 0.01,
                "non_embedding_params": 100,
                "active_params": 10,
            }
            for r, v in losses.items()
        ]

    u = allocation.summarise(points({1.0: 2.0, 0.8: 1.9, 0.6: 1.95, 0.4: 2.005}))
    text = allocation.verdict(u, num_seeds=3)
    assert "rho = 0.8, inside" in text and "U-shape reproduced, with" in text
    assert "within two pooled seed standard deviations" in text
    # Falls beyond the noise (2 x 0.01), then climbs back only 0.01: one arm, not a U.
    arm = allocation.summarise(points({1.0: 2.0, 0.8: 1.9, 0.6: 1.905, 0.4: 1.91}))
    text = allocation.verdict(arm, num_seeds=3)
    assert "one arm of the U, not the U" in text and "U-shape reproduced" not in text
    shallow = allocation.summarise(points({1.0: 2.0, 0.8: 1.99, 0.6: 1.995, 0.4: 2.005}))
    assert "not established beyond seed noise" in allocation.verdict(shallow, num_seeds=3)
    monotone = allocation.summarise(points({1.0: 2.0, 0.8: 1.9, 0.6: 1.8, 0.4: 1.7}))
    assert "U-shape not reproduced" in allocation.verdict(monotone, num_seeds=1)


def test_scaling_verdict_is_computed_from_the_numbers() -> None:
    rows = []
    for i, params in enumerate((1e5, 1e6, 1e7)):
        for kind, offset in (("engram", 0.0), ("overencoding", 0.05)):
            loss = 3.0 - 0.1 * i + offset
            rows.append(
                {"kind": kind, "per_head_size": i, "table_params": params, "val_loss_mean": loss}
            )
            rows[-1]["val_loss_std"] = 0.0
    fits = {k: scaling.fit_log_linear([1e5, 1e6, 1e7], [3.0, 2.9, 2.8]) for k in scaling.KINDS}
    assert math.isclose(fits["engram"]["slope_per_decade"], -0.1) and fits["engram"]["r2"] > 0.99
    res = {"fits": fits, "comparison": scaling.compare(rows), "moe": {"val_loss_mean": 3.1}}
    res["rows"] = rows
    text = scaling.verdict(res, num_seeds=1)
    assert "falls log-linearly" in text and "at 3 of 3 sizes" in text
    assert "ordering reproduced" in text
