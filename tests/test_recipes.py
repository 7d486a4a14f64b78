"""Recipes that restate a configuration written in code stay equal to it; the main job runs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from engramlm.cli import load_configs, main
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


def test_main_job_runs_end_to_end_at_smoke_size(tmp_path, capsys) -> None:
    """`engramlm compare` (the README's `make demo`) on real text at the experiments' smoke
    sizes: three models trained, results.json / table.md / plot written, numbers finite."""
    from engramlm.experiments.common import SMOKE_ENGRAM, SMOKE_MOE, SMOKE_TRAIN

    def flags(section: str, cfg: object, fields: tuple[str, ...]) -> list[str]:
        return [f"--{section}.{f}={json.dumps(getattr(cfg, f))}" for f in fields]

    moe_fields = tuple(
        f.name
        for f in dataclasses.fields(SMOKE_MOE)
        if getattr(SMOKE_MOE, f.name) != getattr(DEFAULT_MOE, f.name)
    )
    train = ("data", "vocab_size", "seq_len", "batch_size", "warmup_steps", "eval_every")
    train += ("eval_batches",)
    out = tmp_path / "compare"
    main(
        ["compare", "--out", str(out), "--steps", "4"]
        + flags("moe", SMOKE_MOE, moe_fields)
        + flags("engram", SMOKE_ENGRAM, ("heads_per_ngram", "embed_dim_per_ngram"))
        + flags("train", SMOKE_TRAIN, train)
    )
    summary = json.loads((out / "results.json").read_text())
    names = [row["model"] for row in summary["rows"]]
    assert names == ["MoE (rho=1)", f"Engram (rho={DEFAULT_RHO:g})", "Dense (iso-FLOP)"]
    for row in summary["rows"]:
        assert math.isfinite(row["val_loss"]) and row["val_loss"] > 0, row
        assert row["tokens_per_s"] > 0
    moe, engram, _ = summary["rows"]
    assert engram["engram_table_params"] > 0 == moe["engram_table_params"]
    assert abs(engram["total_params"] - moe["total_params"]) < 0.01 * moe["total_params"]
    assert (out / "loss_curves.png").stat().st_size > 0
    assert (
        "| MoE (rho=1) |" in (out / "table.md").read_text() and "| Dense" in capsys.readouterr().out
    )


def test_moe_baseline_search_runs_and_reports_margins(tmp_path, monkeypatch, capsys) -> None:
    """recipes/moe_baseline.py at smoke size: every candidate x seed trains the MoE and its
    iso-FLOP dense model; margins are dense - MoE, per seed; results.json is written."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("moe_baseline", RECIPES / "moe_baseline.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "moe_baseline",
            "--smoke",
            "--seeds",
            "0,1",
            "--candidates",
            "demo,narrow-scaled",
            "--sweep-at",
            "narrow-scaled",
        ],
    )
    recipe.main()
    doc = json.loads((tmp_path / "runs/moe_baseline/results.json").read_text())
    assert [r["candidate"] for r in doc["rows"]] == ["demo", "narrow-scaled"]
    for r in doc["rows"]:
        expected = [d - m for d, m in zip(r["dense_val_loss"], r["moe_val_loss"], strict=True)]
        assert r["margin"] == expected and len(expected) == 2
        assert all(math.isfinite(x) and x >= 1.0 for x in r["imbalance"])
        # Evaluated at steps 3 and 6 (smoke: eval_every=3): the last is the final margin.
        assert list(r["margin_by_step"]) == ["3", "6"]
        assert r["margin_by_step"]["6"] == pytest.approx(r["margin_mean"], abs=1e-12)
    assert "margin" in capsys.readouterr().out
    assert not (tmp_path / "docs/records").exists()  # smoke runs are never recorded by default
    # The sweep ran the allocation experiment at that setting, its rho = 1 the search's MoE.
    sweep = tmp_path / "runs/moe_baseline_sweep/allocation"
    result = json.loads((sweep / "results.json").read_text())
    assert result["settings"]["moe"] == {
        "num_experts": 32,
        "expert_hidden_size": 64,
        "ffn_hidden_size": 192,
        "moe_routed_scale": 2.0,
    }
    moe_run = (tmp_path / "runs/moe_baseline/models/narrow-scaled-moe-seed0").resolve()
    assert (sweep / "models/rho1_seed0").resolve() == moe_run
    page = (tmp_path / "runs/moe_baseline/moe_baseline.md").read_text()
    assert "## Allocation sweep at narrow-scaled" in page and "| narrow-scaled |" in page
    # Without a sweep the page holds the search's table and says whether one could run.
    monkeypatch.setattr(sys, "argv", ["moe_baseline", "--smoke", "--seeds", "0,1"])
    recipe.main()
    page = (tmp_path / "runs/moe_baseline/moe_baseline.md").read_text()
    assert "## Allocation sweep" not in page and "| long-8x512 |" in page
    last = page.strip().splitlines()[-1]
    assert (
        last.startswith("Clear: ") or last == "No candidate is clear, so no allocation sweep yet."
    )


def test_moe_baseline_dense_first_trains_the_dense_model_before_the_moe(
    tmp_path, monkeypatch
) -> None:
    """``--dense-first`` swaps the order (so a second process can train the other model); with
    ``--records`` each finished run is kept there too, and a later call that has the records
    but not the runs (a new clone) reads them instead of training."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("moe_baseline", RECIPES / "moe_baseline.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.chdir(tmp_path)
    argv = ["moe_baseline", "--smoke", "--seeds", "0", "--candidates", "demo", "--dense-first"]
    monkeypatch.setattr(sys, "argv", [*argv, "--records", "rec"])
    # A page written before, by searches whose runs this clone lacks: rows this call does not
    # redo are kept as they were; the row of demo at seed 0, which it redoes, is replaced.
    page = tmp_path / "runs/moe_baseline/moe_baseline.md"
    page.parent.mkdir(parents=True)
    header = "| candidate | a | b | seeds | c | d | e | f | clear | g |"
    old_rows = [
        "| demo | - | - | [0] | 9.0000 | 9.5000 | +0.5000 (one seed) | 1.00 | no | 3: +0.500 |",
        "| narrow | x | - | [7] | 5.0000 | 5.1000 | +0.1000 (one seed) | 2.00 | yes | 3: +0.1 |",
    ]
    page.write_text("\n".join(["# old", "", header, "|---|", *old_rows, "", "old text"]) + "\n")
    recipe.main()
    lines = page.read_text().splitlines()
    assert old_rows[1] in lines and old_rows[0] not in lines
    assert any(line.startswith("| demo | - | - | [0] |") for line in lines)
    assert "Clear: narrow" in lines[-1] and "old text" not in lines
    models = tmp_path / "runs/moe_baseline/models"
    finished = {
        k: (models / f"demo-{k}-seed0/result.json").stat().st_mtime_ns for k in ("moe", "dense")
    }
    assert finished["dense"] < finished["moe"]
    records = {json.loads(p.read_text())["key"]: p for p in (tmp_path / "rec").glob("*.json")}
    assert sorted(records) == ["demo-dense-seed0", "demo-moe-seed0"]
    for key, record in records.items():
        assert record.stem == (models / key).resolve().name
    first = json.loads((tmp_path / "runs/moe_baseline/results.json").read_text())["rows"][0]
    import shutil

    from engramlm.experiments import common

    shutil.rmtree(tmp_path / "runs")
    monkeypatch.setattr(common, "train", lambda *a, **k: pytest.fail("retrained"))
    recipe.main()
    again = json.loads((tmp_path / "runs/moe_baseline/results.json").read_text())["rows"][0]
    assert again == first


def _load_script(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_capacity_recipe_reports_the_gain_kept_paired_by_seed(tmp_path, monkeypatch, capsys):
    """recipes/capacity.py at smoke size: the reference, the MoE and both shrunken-table variants
    at two seeds; each variant's share of the gain is (MoE - variant) / (MoE - reference) for
    the same seed, and its tables really are smaller."""
    import sys

    recipe = _load_script(RECIPES / "capacity.py", "capacity")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["capacity", "--smoke", "--seeds", "0,1"])
    recipe.main()
    out = capsys.readouterr().out
    doc = json.loads(out[: out.index("\nseeds")])
    moe, full = doc["moe_val_loss"], doc["full_val_loss"]
    assert [v["key"] for v in doc["variants"]] == ["rows_1_16", "rows_min"]
    for v in doc["variants"]:
        want = [(m - x) / (m - f) for m, x, f in zip(moe, v["val_loss"], full, strict=True)]
        assert v["gain_kept"] == want
        assert v["table_rows"] < doc["full_table_rows"]
    assert "share of the gain kept" in out


def test_tiers_benchmark_binds_its_engram_config_to_the_tokenizer(tmp_path):
    """benchmarks/tiers.py builds its models from configs bound like train's (the n-gram filler
    resolved from the tokenizer): an unbound config is refused by EngramLM."""
    from engramlm.experiments.common import Context

    tiers = _load_script(Path(__file__).parent.parent / "benchmarks" / "tiers.py", "tiers")
    corpus = Context(name="t", smoke=True, out_root=tmp_path).corpus
    backbone = tiers.backbone_config(corpus, 2, 64, 32)
    config = tiers.with_engram(backbone, corpus, tiers.engram_for_rows(10_000, 64))
    assert config.engram.pad_id is not None
    model = tiers.meta_model(config, corpus)
    assert model.layers[1].engram is not None


def test_results_changes_lists_what_a_rerun_moved(tmp_path) -> None:
    """recipes/results_changes.py against two hand-written pages: a section left as it was is
    'not re-run'; in a re-run one, the changed outcome cells come with before, now and change
    (rows matched by their label cells, here two of them), and the verdicts before and now."""
    from engramlm.experiments import report

    recipe = _load_script(RECIPES / "results_changes.py", "results_changes")

    def page(loss: str, nll: str, verdict: str) -> str:
        return "\n".join([
            "# Results", "", "| experiment | what | wall time | plots |", "|---|---|---|---|",
            "| [allocation](#allocation) | a | 1 min | |", "| [longctx](#longctx) | b | 1 min | |",
            "", '<a id="allocation"></a>', "", "## Allocation", "",
            "| rho (nominal) | P_tot | val loss (mean ± std) |", "|---|---|---|",
            f"| 1 | 11.680M | {loss} ± 0.0403 |", "| 0.7 | 11.679M | 4.8125 ± 0.0166 |", "",
            f"**Verdict:** {verdict}", "", '<a id="longctx"></a>', "", "## Long context", "",
            "| task | length | MoE NLL | call |", "|---|---|---|---|",
            f"| NIAH | 256 | {nll} | floor |", "| NIAH | 512 | 3.886 | floor |", "",
        ])  # fmt: skip

    before = page("4.9380", "3.869", "minimum at rho = 0.7.")
    after = page("4.9000", "3.869", "minimum at rho = 0.8.")
    text = recipe.report(before, after)
    assert "- **longctx**: not re-run yet" in text
    assert "| rho (nominal) 1 | val loss (mean ± std) | 4.938 | 4.9 | -0.038 |" in text
    assert "before: **Verdict:** minimum at rho = 0.7." in text
    assert "now: **Verdict:** minimum at rho = 0.8." in text
    assert "P_tot" not in text and "0.7 |" not in text.split("now:")[1]  # context, unchanged
    text = recipe.report(before, page("4.9380", "3.500", "minimum at rho = 0.7."))
    assert "| NIAH / 256 | MoE NLL | 3.869 | 3.5 | -0.369 |" in text
    assert "Verdict unchanged" in text and "**allocation**: not re-run yet" in text
    # The block written into the page survives the page's next rendering.
    written = report.with_changes_block(after, text)
    assert written.index("<!-- changes -->") < written.index('<a id="allocation"></a>')
    assert report.with_changes_block(written, "again").count("<!-- changes -->") == 1
    rendered = report.render(tmp_path / "runs", tmp_path / "img", previous=written)
    assert report.changes_block(rendered) == report.changes_block(written)
    assert "minimum at rho = 0.8." in rendered  # the sections kept from the page as well


def test_moe_baseline_ceiling_and_routing_probe(tmp_path, monkeypatch) -> None:
    """``--ceiling`` adds, per seed, the dense model holding every expert of an MoE layer in
    each FFN, and the page's section computes its gain and the MoE's margin from those runs;
    ``--probe-routing`` scores each MoE as routed, randomly routed and without routed experts
    (the last checked against the model with its experts' output weights zeroed)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("moe_baseline", RECIPES / "moe_baseline.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.chdir(tmp_path)
    argv = ["moe_baseline", "--smoke", "--seeds", "0,1", "--candidates", "demo", "--ceiling", "1"]
    argv.append("--probe-routing")
    monkeypatch.setattr(sys, "argv", argv)
    recipe.main()
    out = tmp_path / "runs/moe_baseline"
    moe = json.loads((out / "models/demo-moe-seed0/config.json").read_text())["model"]
    wide = json.loads((out / "models/demo-ceiling-seed1/config.json").read_text())["model"]
    assert wide["num_experts"] == 0
    width = (moe["num_experts"] + moe["num_shared_experts"]) * moe["expert_hidden_size"]
    assert wide["ffn_hidden_size"] == width and moe["hidden_size"] == wide["hidden_size"]
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert not (out / "models/demo-ceiling-seed0").exists()  # --ceiling 1: seed 1's only
    ceiling = json.loads((out / "models/demo-ceiling-seed1/result.json").read_text())["val_loss"]
    assert row["ceiling_val_loss"] == [None, ceiling]
    dense = row["dense_val_loss"][1]
    gain = dense - ceiling
    page = (out / "moe_baseline.md").read_text()
    assert "## What the experts' parameters could buy" in page
    section = page.split("## What the experts'")[1].split("## Are the experts")[0].splitlines()
    (line,) = [x for x in section if x.startswith("| demo | 1 | ")]
    assert not any(x.startswith("| demo | 0 | ") for x in section)
    cells = recipe.cells(line)
    assert (
        cells[2] == f"{dense:.4f}" and cells[4] == f"{ceiling:.4f}" and cells[5] == f"{gain:+.4f}"
    )
    assert cells[6] == f"{dense - row['moe_val_loss'][1]:+.4f}"
    # The routing probe, recomputed here on the same held-out windows.
    import torch

    from engramlm.experiments.pair import heldout_windows
    from engramlm.train import load_run

    model, _ = load_run(out / "models/demo-moe-seed0")
    model.eval()
    corpus = recipe.Context(name="x", smoke=True, out_root=tmp_path / "x").corpus
    seq_len = json.loads((out / "models/demo-moe-seed0/config.json").read_text())["train"][
        "seq_len"
    ]
    x, y = heldout_windows(corpus, seq_len, 4)
    probe = row["routing_probe"][0]
    with torch.no_grad():
        assert float(model(x, targets=y).loss) == pytest.approx(probe["learned"], abs=1e-5)
        for moe in model.moe_layers().values():
            moe.down_proj.zero_()
        assert float(model(x, targets=y).loss) == pytest.approx(probe["none"], abs=1e-5)
    assert probe["random"] != probe["learned"] and len(row["routing_probe"]) == 2
    assert "## Are the experts idle?" in page
    assert any(x.startswith("| demo | 1 | ") for x in page.splitlines())
    # A later call that neither probes nor reads the ceiling runs (a new clone has records, not
    # weights) keeps both tables' rows as they were; one that redoes them writes each row once.
    tables = [x for x in page.splitlines() if x.startswith(("| demo | 0 | ", "| demo | 1 | "))]
    assert len(tables) == 3  # the ceiling at seed 1, the probe at seeds 0 and 1
    for call in (argv[:-3], argv):
        monkeypatch.setattr(sys, "argv", call)
        recipe.main()
        again = (out / "moe_baseline.md").read_text()
        assert [x for x in again.splitlines() if x in tables] == tables
        assert "## What the experts' parameters could buy" in again
        assert again.count("## Are the experts idle?") == 1


def test_moe_baseline_sweep_points_train_in_order_and_the_sweep_reads_them(
    tmp_path, monkeypatch, capsys
) -> None:
    """``--sweep-points`` trains just the named points of the sweep, in that order, with the keys
    and configs the allocation experiment gives them: the full ``--sweep-at`` call afterwards
    trains only the others (the named runs' results are untouched). Bad points are refused."""
    import sys

    recipe = _load_script(RECIPES / "moe_baseline.py", "moe_baseline")
    monkeypatch.chdir(tmp_path)
    base = ["moe_baseline", "--smoke", "--seeds", "0,1", "--candidates", "demo", "--records", "rec"]
    monkeypatch.setattr(sys, "argv", [*base, "--sweep-at", "demo", "--sweep-points", "0.4:1,0.7:0"])
    recipe.main()
    models = tmp_path / "runs/moe_baseline_sweep/allocation/models"
    assert sorted(p.name for p in models.iterdir()) == ["rho0.4_seed1", "rho0.7_seed0"]
    done = {
        k: (models / k / "result.json").stat().st_mtime_ns for k in ("rho0.4_seed1", "rho0.7_seed0")
    }
    assert done["rho0.4_seed1"] < done["rho0.7_seed0"]
    assert not (models.parent / "results.json").exists()  # points only: no sweep, no page
    assert (
        "sweep point rho 0.4 seed 1 (achieved 0.380, 4 routed experts): " in capsys.readouterr().out
    )
    monkeypatch.setattr(sys, "argv", [*base, "--sweep-at", "demo"])
    recipe.main()
    assert {k: (models / k / "result.json").stat().st_mtime_ns for k in done} == done
    assert len(list(models.iterdir())) == 6  # SMOKE_RHOS x 2 seeds
    result = json.loads((models.parent / "results.json").read_text())
    point = next(p for p in result["results"]["points"] if p["rho"] == 0.4)
    assert (
        point["val_loss"][1]
        == json.loads((models / "rho0.4_seed1/result.json").read_text())["val_loss"]
    )
    # Below the sweep's lowest rho (0.4 at smoke size): trained and recorded, not in its table.
    monkeypatch.setattr(sys, "argv", [*base, "--sweep-at", "demo", "--sweep-points", "0.2:0"])
    recipe.main()
    assert (models / "rho0.2_seed0/result.json").exists()
    assert "rho 0.2 seed 0 (achieved 0.190, 3 routed experts, beyond the sweep)" in (
        capsys.readouterr().out
    )
    assert json.loads((models.parent / "results.json").read_text())["results"] == result["results"]
    # The sweep's page lists it apart, beside rho = 1 and the lowest rho at the same seed; so
    # does a new clone's (records, no runs), without training anything.
    loss = json.loads((models / "rho0.2_seed0/result.json").read_text())["val_loss"]
    by_rho = {p["rho"]: p["val_loss"] for p in result["results"]["points"]}
    expected = (
        f"| 0.2 | 0.190 | 3 | {{}} | {loss:.4f} / - | {loss - by_rho[1.0][0]:+.4f} / - | "
        f"{loss - by_rho[0.4][0]:+.4f} / - |"
    )
    from engramlm.experiments import common

    for call in ("here", "new clone"):
        if call == "new clone":
            import shutil

            shutil.rmtree(tmp_path / "runs")
            monkeypatch.setattr(common, "train", lambda *a, **k: pytest.fail("retrained"))
        monkeypatch.setattr(sys, "argv", [*base, "--sweep-at", "demo"])
        recipe.main()
        page = (tmp_path / "runs/moe_baseline/moe_baseline.md").read_text()
        section = page.split("### Beyond the sweep's left end")[1].splitlines()
        (row,) = [x for x in section if x.startswith("| 0")]
        table_size = recipe.cells(row)[3]
        assert row == expected.format(table_size) and int(table_size.replace(",", "")) >= 2
        seed0 = {rho: losses[0] for rho, losses in by_rho.items()} | {0.2: loss}
        seed1 = {rho: losses[1] for rho, losses in by_rho.items()}  # 0.2 not trained at seed 1
        lowest = [min(seed0, key=seed0.get), min(seed1, key=seed1.get)]
        assert (
            f"Lowest loss over the sweep and these points: rho = {lowest[0]:g} at seed 0, "
            f"rho = {lowest[1]:g} at seed 1." in page
        )
        assert "img/results/" not in page  # the experiment's own figure is not this sweep's
    for bad, message in [
        ("0.9:0", "not a point of this sweep"),  # 0.9 is not a smoke rho
        ("0.25:0", "not a point of this sweep"),  # below the sweep, but not of BEYOND_RHOS
        ("0.4:5", "not a point of this sweep"),
        ("0.4", "is not RHO:SEED"),
    ]:
        monkeypatch.setattr(sys, "argv", [*base, "--sweep-at", "demo", "--sweep-points", bad])
        with pytest.raises(SystemExit):
            recipe.main()
        assert message in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", [*base, "--sweep-points", "0.4:0"])
    with pytest.raises(SystemExit):
        recipe.main()
    assert "needs --sweep-at" in capsys.readouterr().err
