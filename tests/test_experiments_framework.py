"""The experiments framework: cached/resumable runs, finite results, the results page, the CLI."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from engramlm import experiments
from engramlm.cli import main
from engramlm.experiments import report
from engramlm.experiments.common import Context, check_finite


@pytest.fixture
def fake_experiment(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A registered experiment that writes one number and one plot, counting its runs."""
    module = types.ModuleType("engramlm.experiments._fake")
    module.calls = 0

    def run(ctx: Context) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        module.calls += 1
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        ctx.savefig(fig, "line")
        return {"value": 1.5, "seeds": list(ctx.seeds)}

    def render(doc: dict) -> str:
        return f"## Fake (`engramlm experiment fake`)\n\nvalue {doc['results']['value']}\n"

    module.run, module.report = run, render
    monkeypatch.setitem(sys.modules, "engramlm.experiments._fake", module)
    monkeypatch.setattr(experiments, "EXPERIMENTS", {"fake": ("_fake", "a fake experiment")})
    monkeypatch.setattr(report, "EXPERIMENTS", experiments.EXPERIMENTS)
    return module


def test_results_json_and_page(fake_experiment: types.ModuleType, tmp_path: Path) -> None:
    doc = experiments.run_experiment("fake", out_root=tmp_path, seeds=(0, 1), progress=False)
    assert doc["results"] == {"value": 1.5, "seeds": [0, 1]} and doc["wall_seconds"] >= 0
    assert json.loads((tmp_path / "fake" / "results.json").read_text()) == doc
    assert (tmp_path / "fake" / "line.png").stat().st_size > 0
    page = report.write_page(tmp_path, tmp_path / "docs" / "results.md")
    text = page.read_text()
    assert "value 1.5" in text and "[line](img/results/fake/line.png)" in text
    assert (tmp_path / "docs" / "img" / "results" / "fake" / "line.png").exists()


def test_sections_without_results_are_kept_from_the_previous_page(
    fake_experiment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout that reruns one experiment keeps the others' sections (runs/ is not committed)."""
    experiments.run_experiment("fake", out_root=tmp_path / "a", progress=False)
    page = report.write_page(tmp_path / "a", tmp_path / "docs" / "results.md")
    first = page.read_text()
    assert "[results.json](img/results/fake/results.json)" in first
    copied = tmp_path / "docs" / "img" / "results" / "fake" / "results.json"
    copied = json.loads(copied.read_text())
    assert copied["results"]["value"] == 1.5
    # A second experiment is registered and run in a checkout without the first one's runs.
    other = types.ModuleType("engramlm.experiments._other")
    other.run = lambda ctx: {"value": 2.5}
    other.report = lambda doc: f"## Other\n\nvalue {doc['results']['value']}\n"
    monkeypatch.setitem(sys.modules, "engramlm.experiments._other", other)
    registry = {**experiments.EXPERIMENTS, "other": ("_other", "another experiment")}
    monkeypatch.setattr(experiments, "EXPERIMENTS", registry)
    monkeypatch.setattr(report, "EXPERIMENTS", registry)
    experiments.run_experiment("other", out_root=tmp_path / "b", progress=False)
    text = report.write_page(tmp_path / "b", page).read_text()
    assert "value 1.5" in text and "value 2.5" in text
    assert "| [fake](#fake) | a fake experiment |" in text and "| [other](#other) |" in text
    assert text.count('<a id="fake"></a>') == 1 and "Not run yet" not in text
    # Without a previous page, an experiment with no results is reported as not run.
    assert "Not run yet at full size: `engramlm experiment fake`" in report.render(
        tmp_path / "b", tmp_path / "img"
    )


def test_smoke_results_never_reach_the_page(fake_experiment, tmp_path: Path) -> None:
    experiments.run_experiment("fake", out_root=tmp_path, smoke=True, progress=False)
    text = report.render(tmp_path, tmp_path / "img")
    assert "Not run yet" in text and "value 1.5" not in text


def test_cli_runs_and_rewrites_the_page(
    fake_experiment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "results.md"
    main(["experiment", "fake", "--out", str(tmp_path), "--seeds", "3", "--page", str(page)])
    assert "value 1.5" in page.read_text()
    with pytest.raises(SystemExit) as exit:
        main(["experiment", "fake", "--out", str(tmp_path), "--seeds", "a,b"])
    assert exit.value.code == 2 and "--seeds must be comma-separated" in capsys.readouterr().err


def test_unknown_experiment_and_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown experiment 'nope'; known: allocation"):
        experiments.run_experiment("nope", out_root=tmp_path)
    with pytest.raises(ValueError, match="--scale must be > 0"):
        Context(name="x", out_root=tmp_path, scale=0)
    with pytest.raises(ValueError, match="at least one seed"):
        Context(name="x", out_root=tmp_path, seeds=())


def test_non_finite_results_are_refused() -> None:
    check_finite({"a": [1.0, {"b": 2}]})
    with pytest.raises(ValueError, match=r"results\.a\[1\]\.b is nan"):
        check_finite({"a": [1.0, {"b": float("nan")}]})


def test_scale_multiplies_steps(tmp_path: Path) -> None:
    base = Context(name="x", out_root=tmp_path).train_config()
    grown = Context(name="x", out_root=tmp_path, scale=2.5).train_config(seed=3)
    assert grown.steps == round(base.steps * 2.5) and grown.seed == 3
    assert Context(name="x", out_root=tmp_path, smoke=True).train_config().steps < 10


def test_training_runs_are_cached_resumed_and_redone_on_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engramlm.experiments import common

    ctx = Context(name="cache", out_root=tmp_path, smoke=True, progress=False)
    calls: list[bool] = []
    real_train = common.train

    def counting_train(*args, **kwargs):
        calls.append(kwargs["resume"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(common, "train", counting_train)
    cfg = ctx.train_config(steps=2, ckpt_every=1, eval_every=2)
    first = ctx.train("moe", ctx.base_moe, cfg)
    again = ctx.train("moe", ctx.base_moe, cfg)
    assert calls == [False] and again.val_loss == first.val_loss  # read back, not retrained
    assert (tmp_path / "cache" / "models" / "moe").resolve().parent.name == "_models"
    (tmp_path / "cache" / "models" / "moe" / "result.json").unlink()  # cut off after the end
    ctx.train("moe", ctx.base_moe, cfg)
    assert calls == [False, True]  # resumed from its checkpoint
    ctx.train("moe", ctx.base_moe, ctx.train_config(steps=3))
    assert calls == [False, True, False]  # another config: trained from scratch
    assert ctx.load("moe").config.num_layers == ctx.base_moe.num_layers
    monkeypatch.setattr(common, "BEHAVIOUR_VERSION", common.BEHAVIOUR_VERSION + 1)
    ctx.train("moe", ctx.base_moe, ctx.train_config(steps=3))
    assert calls == [False, True, False, False]  # same configs, new behaviour: not reused


def test_settings_override_the_base_configs(tmp_path: Path) -> None:
    ctx = Context(
        name="x",
        out_root=tmp_path,
        settings={"moe": {"hidden_size": 128}, "engram": {"layer_ids": [2]}, "train": {"lr": 1e-3}},
    )
    assert ctx.base_moe.hidden_size == 128 and ctx.base_engram.layer_ids == (2,)
    assert ctx.train_config().lr == 1e-3 and ctx.train_config(lr=5e-4).lr == 5e-4
    with pytest.raises(ValueError, match="only --moe"):
        Context(name="x", out_root=tmp_path, settings={"model": {"hidden_size": 1}})
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        Context(name="x", out_root=tmp_path, settings={"moe": {"width": 1}})


def test_cli_passes_settings(fake_experiment, tmp_path: Path, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(fake_experiment, "run", lambda ctx: seen.append(ctx.settings) or {})
    main(["experiment", "fake", "--out", str(tmp_path), "--page", "", "--train.steps=7"])
    assert seen == [{"train": {"steps": 7}}]


def test_a_run_being_trained_elsewhere_is_waited_for_then_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import threading

    from engramlm.experiments import common

    ctx = Context(name="wait", out_root=tmp_path, smoke=True, progress=False)
    cfg = ctx.train_config(steps=2)
    first = ctx.train("moe", ctx.base_moe, cfg)  # stored once; now pretend it is in progress
    run_dir = (tmp_path / "wait" / "models" / "moe").resolve()
    result = run_dir / "result.json"
    saved = result.read_text()
    result.unlink()
    calls: list[int] = []
    monkeypatch.setattr(common, "train", lambda *a, **k: calls.append(1))
    got: list = []
    with open(run_dir.parent / f"{run_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "another process" is training it
        waiter = threading.Thread(target=lambda: got.append(ctx.train("moe", ctx.base_moe, cfg)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not got  # blocked on the lock, not training
        result.write_text(saved)  # the other trainer finishes
    waiter.join(timeout=10)
    assert calls == [] and got[0].val_loss == first.val_loss


def test_a_link_made_by_a_concurrent_experiment_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two experiments started side by side may both find models/<key> missing; the second's
    symlink then fails with FileExistsError (seen running `scaling` twice), which must not end
    the experiment when the link already points at the same stored run."""
    ctx = Context(name="race", out_root=tmp_path, smoke=True, progress=False)
    cfg = ctx.train_config(steps=2)
    first = ctx.train("moe", ctx.base_moe, cfg)
    link = tmp_path / "race" / "models" / "moe"
    target = link.readlink()
    link.unlink()
    real_symlink_to = Path.symlink_to

    def racing(self: Path, *args: object, **kwargs: object) -> None:
        real_symlink_to(self, target, target_is_directory=True)  # the other process wins
        raise FileExistsError(17, "File exists", str(self))

    monkeypatch.setattr(Path, "symlink_to", racing)
    assert ctx.train("moe", ctx.base_moe, cfg).val_loss == first.val_loss
    assert link.readlink() == target


def test_finished_runs_are_kept_as_records_and_read_back_without_their_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new clone has no runs/ folder: a run with a record (committed) is read from it, not
    retrained; a record whose configuration is not its digest's is refused."""
    import shutil

    from engramlm.experiments import common

    records = tmp_path / "records"
    ctx = Context(
        name="rec", out_root=tmp_path / "a", smoke=True, progress=False, records_root=records
    )
    cfg = ctx.train_config(steps=2, eval_every=2)
    first = ctx.train("moe", ctx.base_moe, cfg)
    (record,) = records.glob("*.json")
    run_dir = (tmp_path / "a" / "rec" / "models" / "moe").resolve()
    assert record.stem == run_dir.name  # named by the run's digest
    doc = json.loads(record.read_text())
    assert doc["key"] == "moe" and doc["config"]["train"]["steps"] == 2
    assert doc["result"]["val_loss"] == first.val_loss
    assert doc["result"]["threads"] == torch.get_num_threads()
    shutil.rmtree(tmp_path / "a")  # a fresh clone: no runs at all
    calls: list[int] = []
    monkeypatch.setattr(common, "train", lambda *a, **k: calls.append(1) or first)
    fresh = Context(
        name="rec", out_root=tmp_path / "b", smoke=True, progress=False, records_root=records
    )
    again = fresh.train("moe", fresh.base_moe, cfg)
    assert calls == [] and again.val_loss == first.val_loss and again.history == first.history
    # Another configuration has no record: trained (here: the stub is called), then recorded.
    fresh.train("moe", fresh.base_moe, fresh.train_config(steps=3, eval_every=3))
    assert calls == [1] and len(list(records.glob("*.json"))) == 2
    # A record edited to another configuration is refused, naming the fix.
    doc["config"]["train"]["steps"] = 7
    record.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="Delete it to retrain"):
        fresh.train("moe", fresh.base_moe, cfg)


def test_a_run_trains_on_the_corpus_its_training_config_names(tmp_path: Path) -> None:
    """A recipe's candidate that names other data than the experiment's default trains on that
    data (its own tokenizer), not on the default corpus; the default stays the default."""
    import sysconfig

    from engramlm.data import prepare_corpus

    text = tmp_path / "text"
    text.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap", "argparse", "difflib", "pprint", "shlex", "fractions"):
        (text / f"{name}.txt").write_text((stdlib / f"{name}.py").read_text() * 2)
    ctx = Context(name="data", out_root=tmp_path / "runs", smoke=True, progress=False)
    other = ctx.train_config(steps=2, eval_every=2, data=str(text), val_fraction=0.2)
    ctx.train("other", ctx.base_moe, other)
    ctx.train("default", ctx.base_moe, ctx.train_config(steps=2, eval_every=2))
    runs = tmp_path / "runs" / "data" / "models"
    fingerprint = {
        key: json.loads((runs / key / "config.json").read_text())["tokenizer_fingerprint"]
        for key in ("other", "default")
    }
    wanted = prepare_corpus(str(text), vocab_size=other.vocab_size, val_fraction=0.2)
    assert fingerprint["other"] == wanted.compressed_vocab.fingerprint
    assert fingerprint["default"] == ctx.corpus.compressed_vocab.fingerprint
    assert fingerprint["other"] != fingerprint["default"]
    assert ctx.corpus_for(other) is ctx.corpus_for(other)  # prepared once


def test_a_run_is_scored_on_the_split_it_was_held_out_from(tmp_path: Path) -> None:
    """An experiment splits its corpus once (seed 0) for every training seed: scoring a seed-1
    run later rebuilds the seed-0 split its config.json keeps, and gives its final validation
    loss; a run that does not keep its split and cannot be rebuilt from its training seed is
    refused, naming --split-seed."""
    from engramlm.train import evaluate_run

    ctx = Context(name="split", out_root=tmp_path, smoke=True, progress=False)
    cfg = ctx.train_config(steps=2, eval_every=2, seed=1)
    result = ctx.train("moe", ctx.base_moe, cfg)
    run = (tmp_path / "split" / "models" / "moe").resolve()
    saved = json.loads((run / "config.json").read_text())
    assert saved["split"] == {"seed": 0, "tuning": False}
    loss, _, _ = evaluate_run(run, max_batches=cfg.eval_batches)
    assert loss == pytest.approx(result.val_loss, abs=1e-6)
    del saved["split"]  # as runs were written before they kept their split
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="--split-seed 0"):
        evaluate_run(run, max_batches=cfg.eval_batches)
    loss, _, _ = evaluate_run(run, max_batches=cfg.eval_batches, split_seed=0)
    assert loss == pytest.approx(result.val_loss, abs=1e-6)
