"""What a user meets at the command line: help that lists every option, a version, one-line
errors for their mistakes (tracebacks only with -v), and a CLI that nothing else imports."""

from __future__ import annotations

import ast
import dataclasses
import json
import shlex
import tomllib
from pathlib import Path

import pytest

import engramlm
from engramlm.cli import TRAIN_EXAMPLES, TRAIN_OVERRIDES, USER_ERRORS, build_parser, load_configs
from engramlm.cli import main as cli_main
from engramlm.config import EngramConfig, ModelConfig
from engramlm.overrides import apply_overrides, describe, option_names
from engramlm.train import TrainConfig

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "recipes" / "tiny.toml")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``engramlm ARGV``."""
    capsys.readouterr()
    try:
        cli_main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# --- help and version ----------------------------------------------------------------------


def test_train_help_lists_every_config_field_with_its_default(capsys) -> None:
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    configs = [(ModelConfig(), "model"), (EngramConfig(), "model.engram"), (TrainConfig(), "train")]
    for config, prefix in configs:
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            shown = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            assert f"--{prefix}.{field.name}={shown}" in listed, (prefix, field.name)


def test_every_config_field_has_a_meaning_in_its_help() -> None:
    """The help is each field's comment in the dataclass: a new field needs one."""
    undocumented = [f.name for f in describe(TRAIN_OVERRIDES) if not f.help]
    assert undocumented == []


def test_train_help_examples_are_valid_commands() -> None:
    examples = [line.split() for line in TRAIN_EXAMPLES.splitlines() if "engramlm train" in line]
    assert len(examples) >= 3
    for example in examples:
        args, overrides = build_parser().parse_known_args(shlex.split(" ".join(example[1:])))
        assert args.command == "train" and overrides
        load_configs(str(ROOT / args.config), overrides)  # raises on an unknown or bad field


def test_top_level_help_says_what_each_command_does(capsys) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ")]
    assert set(commands) <= set(listed)
    assert "make demo" in out and "engramlm train" in out


def test_version_is_the_packages(capsys) -> None:
    code, out, _ = run_cli(capsys, "--version")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert code == 0 and out.strip() == f"engramlm {project['version']}"
    assert engramlm.__version__ == project["version"]


# --- overrides ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "suggested"),
    [
        ("--train.stpes=3", "--train.steps"),
        ("--trian.steps=3", "--train.steps"),
        ("--steps=3", "--train.steps"),  # a missing section must not be silently ignored
        ("--model.engram.layerids=[1]", "--model.engram.layer_ids"),
        ("--model.hiden_size=8", "--model.hidden_size"),
    ],
)
def test_unknown_option_is_an_error_naming_the_closest_valid_one(
    capsys, flag: str, suggested: str
) -> None:
    code, _, err = run_cli(capsys, "train", "--config", TINY, flag)
    key = flag.split("=")[0]
    assert code == 2
    assert err.strip() == f"engramlm train: error: unknown option {key}; did you mean {suggested}?"


def test_unknown_field_in_a_config_file_names_the_closest(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nstesp = 3\n")
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        load_configs(str(toml), [])


def test_override_parsing_lives_with_the_configs() -> None:
    tree = apply_overrides({"train": {"steps": 1}}, ["--train.steps=5", "--train.lr=1e-3"])
    assert tree == {"train": {"steps": 5, "lr": 1e-3}}
    assert "model.engram.layer_ids" in option_names(TRAIN_OVERRIDES)


def test_no_library_module_imports_the_cli() -> None:
    """The CLI is the top floor: compare, experiments, ... never import it (at any depth of a
    function), so the package has no import circle through it."""
    importers = []
    for path in (ROOT / "src" / "engramlm").rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            if "engramlm.cli" in names:
                importers.append(path.name)
    assert importers == []


# --- user errors ---------------------------------------------------------------------------

USER_MISTAKES = {
    "eval-no-run": (["eval", "--run", "{tmp}/absent"], "does not exist: pass a run folder"),
    "eval-not-a-run": (["eval", "--run", "{tmp}"], "holds no run"),
    "generate-empty-prompt": (["generate", "--run", "{tmp}", "--prompt", ""], "--prompt is empty"),
    "generate-no-run": (["generate", "--run", "{tmp}/absent", "--prompt", "x"], "does not exist"),
    "train-no-config": (["train", "--config", "{tmp}/absent.toml"], "does not exist"),
    "train-bad-value": (["train", "--config", TINY, "--train.steps=0"], "steps must be >= 1"),
    "train-bad-toml": (["train", "--config", "{tmp}/bad.toml"], "is not valid TOML"),
    "compare-bad-override": (["compare", "--rhoo=0.5"], "did you mean --rho?"),
    "export-no-run": (["tables", "export", "--run", "{tmp}/a", "--out", "{tmp}/t"], "does not"),
    "import-no-run": (["tables", "import", "--run", "{tmp}/a", "--tables", "{tmp}"], "does not"),
    "experiment-bad-seeds": (["experiment", "gates", "--seeds", "a"], "--seeds must be"),
}


@pytest.mark.parametrize("mistake", list(USER_MISTAKES))
def test_user_mistake_is_one_line_and_exit_status_2(capsys, tmp_path: Path, mistake: str) -> None:
    argv, says = USER_MISTAKES[mistake]
    (tmp_path / "bad.toml").write_text("[train\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"engramlm {argv[0]}") and says in err, err


def test_verbose_keeps_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(USER_ERRORS, match="does not exist"):
        cli_main(["-v", "eval", "--run", str(tmp_path / "absent")])


def test_options_a_command_does_not_take_are_refused(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "eval", "--run", str(tmp_path), "--train.steps=3")
    assert code == 2 and "unrecognized arguments: --train.steps=3" in err
