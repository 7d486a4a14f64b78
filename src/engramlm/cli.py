"""The ``engramlm`` command: parses flags into configs and calls one function; nothing else.

    engramlm train --config recipes/tiny.toml --train.steps=200 --model.hidden_size=128
    engramlm eval --run runs/train [--data FILE] [--table-storage disk]
    engramlm generate --run runs/train --prompt "The list type" [--temperature 0.8]
    engramlm generate --model-dir qwen4-exp/ --engram-tables disk --prompt "The list type"
    engramlm compare [--steps N] [--out runs/compare]
    engramlm tables export --run runs/train --out tables/
    engramlm tables import --tables tables/ --run runs/train [--storage disk]
    engramlm retrofit --model-dir hf_model/ --out runs/retrofit --steps 200 --engram.layer_ids=[1]

A config file is TOML with ``[model]`` (``[model.engram]`` nested) and ``[train]`` tables; any
field can be overridden with a dotted flag (``engramlm.overrides``; ``train --help`` lists them
all, from the dataclasses). A user's mistake (``USER_ERRORS``) ends in one line on stderr and
exit status 2; ``-v`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from engramlm import __version__
from engramlm.config import EngramConfig, ModelConfig
from engramlm.overrides import Schema, apply_overrides, format_fields
from engramlm.train import TrainConfig

# The sections `engramlm train` overrides, and the dataclass each one fills.
TRAIN_OVERRIDES: Schema = {"model": ModelConfig, "train": TrainConfig}
# Mistakes a user can make (a missing file, a bad value, an optional package not installed):
# one line and exit status 2, not a traceback; `-v` shows the traceback. Anything else (a bug)
# keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def load_configs(path: str | None, overrides: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """A TOML file (or the built-in ``tiny`` model) plus overrides -> (ModelConfig, TrainConfig).

    Unknown sections, fields and override keys are ``ValueError``s naming the closest valid one.
    """
    tree: dict[str, Any] = {"model": ModelConfig.preset("tiny").to_dict(), "train": {}}
    if path is not None:
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"config file {file} does not exist; check the --config path")
        try:
            loaded = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{file} is not valid TOML: {e}") from e
        unknown = set(loaded) - set(TRAIN_OVERRIDES)
        if unknown:
            raise ValueError(f"{file}: unknown sections {sorted(unknown)}; use [model], [train]")
        if "model" in loaded:
            tree["model"] = loaded["model"]
        tree["train"] = loaded.get("train", {})
    tree = apply_overrides(tree, overrides, TRAIN_OVERRIDES)
    return ModelConfig.from_dict(tree["model"]), TrainConfig.from_dict(tree["train"])


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    """Train a model on real text and save it, with checkpoints, metrics and plots, in a run
    folder (runs/train unless --train.out_dir says otherwise). Under torchrun, trains on
    several processes with the Engram tables sharded across them."""
    from engramlm.train import train

    model_cfg, train_cfg = load_configs(args.config, overrides)
    result = train(model_cfg, train_cfg, resume=args.resume)
    if _rank() == 0:
        print(
            f"done: {result.steps} steps, {result.tokens:,} tokens, val loss "
            f"{result.val_loss:.4f} nats, {result.val_bpb:.4f} bits/byte, "
            f"{result.tokens_per_s:,.0f} tok/s -> {result.out_dir}"
        )


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints and logs info."""
    return int(os.environ.get("RANK", "0"))


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> None:
    """Score a trained run: validation loss and bits per byte, on its held-out split or on a
    text file of yours."""
    from engramlm.train import evaluate_run

    loss, bpb, tokens = evaluate_run(
        args.run,
        data=args.data,
        max_batches=args.max_batches,
        table_storage=args.table_storage,
        split_seed=args.split_seed,
    )
    print(
        f"{args.data or 'validation split'}: loss {loss:.4f} nats, {bpb:.4f} bits/byte, "
        f"{tokens:,} tokens"
    )


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> None:
    """Continue a prompt with a trained run's model (--run), printing the text as it comes, or
    with a released model's folder (--model-dir) whose n-gram tables stay on --engram-tables."""
    from engramlm.generate import generate_text

    if not args.prompt.strip():
        raise ValueError("--prompt is empty: give some text to continue, e.g. --prompt 'The list'")
    if args.model_dir is not None:
        from engramlm.hf import generate_offloaded

        text = generate_offloaded(
            args.model_dir,
            args.prompt,
            engram_tables=args.engram_tables,
            table_dir=args.table_dir,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            seed=args.seed,
        )
        sys.stdout.write(args.prompt + text + "\n")
        return
    printed = False

    def show(piece: str) -> None:  # the prompt first, once the run has loaded (not on an error)
        nonlocal printed
        sys.stdout.write(piece if printed else args.prompt + piece)
        sys.stdout.flush()
        printed = True

    generate_text(
        args.run,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
        on_text=show,
    )
    sys.stdout.write(("" if printed else args.prompt) + "\n")


def cmd_compare(args: argparse.Namespace, overrides: list[str]) -> None:
    """The README's demo (make demo): trains an MoE, an Engram model with the same total
    parameters, and a dense model with the same compute on the same text, then prints their
    held-out losses side by side and plots the loss curves."""
    from engramlm.compare import run_compare

    run_compare(out_dir=args.out, steps=args.steps, overrides=overrides)


def cmd_tables_export(args: argparse.Namespace, overrides: list[str]) -> None:
    """Write a trained run's Engram tables as disk tables (one folder per layer)."""
    from engramlm.table_io import export_tables

    for path in export_tables(args.run, args.out):
        print(f"wrote {path}")


def cmd_tables_import(args: argparse.Namespace, overrides: list[str]) -> None:
    """Put exported (or disk-tier) Engram tables into a run's newest checkpoint, stored the
    way --storage keeps tables; the run's Adam moments are kept."""
    from engramlm.table_io import import_tables

    path = import_tables(args.run, args.tables, storage=args.storage)
    print(f"imported the tables of {args.tables} into {path}")


def cmd_retrofit(args: argparse.Namespace, overrides: list[str]) -> None:
    """Add Engram to a Hugging Face model saved in a local folder and train only Engram, the
    model itself frozen; reports the validation loss before and after."""
    from engramlm.retrofit import RETROFIT_TRAIN, retrofit_pretrained

    tree = apply_overrides({}, overrides, RETROFIT_OVERRIDES)
    config = dataclasses.replace(
        RETROFIT_TRAIN,
        data=args.data,
        steps=args.steps,
        lr=args.lr,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_batches=args.eval_batches,
    )
    report = retrofit_pretrained(
        args.model_dir, args.out, engram_overrides=tree.get("engram", {}), config=config
    )
    print(
        f"val loss {report['val_loss_before']:.4f} -> {report['val_loss_after']:.4f} nats after "
        f"{report['steps']} Engram-only steps ({report['trainable_params']:,} parameters) "
        f"-> {args.out}"
    )


RETROFIT_OVERRIDES: Schema = {"engram": EngramConfig}


def cmd_experiment(args: argparse.Namespace, overrides: list[str]) -> None:
    """Run one of the paper's experiments in miniature (or all of them), writing its numbers
    and plots to runs/NAME/ and its section of docs/results.md."""
    from engramlm.experiments import EXPERIMENTS, run_experiment
    from engramlm.experiments.common import OVERRIDES
    from engramlm.experiments.report import write_page

    settings = apply_overrides({}, overrides, OVERRIDES)  # --moe.* / --engram.* / --train.*
    names = {"all": list(EXPERIMENTS), "report": []}.get(args.name, [args.name])
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise ValueError(
            f"--seeds must be comma-separated integers, e.g. --seeds 0,1,2; got {args.seeds!r}"
        ) from None
    for name in names:
        run_experiment(
            name,
            out_root=Path(args.out),
            scale=args.scale,
            smoke=args.smoke,
            seeds=seeds,
            device=args.device,
            data=args.data,
            settings=settings,
        )
        if args.page and not args.smoke:
            print(f"results page: {write_page(args.out, args.page)}")
    if args.name == "report":
        print(f"results page: {write_page(args.out, args.page or 'docs/results.md')}")


ABOUT = """\
Engram language models: conditional memory (hashed n-gram embedding tables) added to a
Transformer, trained on real text on a CPU or a GPU.

Start with `engramlm compare` (the README's demo), or train your own model:
  engramlm train --config recipes/tiny.toml --train.steps=200
  engramlm generate --run runs/tiny --prompt "The list type"
`engramlm COMMAND --help` lists a command's options."""

TRAIN_EXAMPLES = """\
Every field of the model and training configs can be set with --SECTION.FIELD=VALUE (VALUE is
JSON: 3, 1e-3, true, [1,2]; anything else is a string). Precedence: built-in defaults (the tiny
model), then the --config file, then these flags. Examples:
  engramlm train --config recipes/tiny.toml --train.steps=200 --train.lr=1e-3
  engramlm train --config recipes/tiny.toml --model.hidden_size=128 --model.engram.layer_ids=[1,2]
  engramlm train --config recipes/tiny.toml --train.data=notes.txt --train.out_dir=runs/notes
  engramlm train --config recipes/tiny.toml --train.out_dir=runs/notes --resume

Fields, with their defaults (--model.engram.* apply when the model has Engram, as in the
recipes):
"""


def _train_epilog() -> str:
    return TRAIN_EXAMPLES + format_fields(TRAIN_OVERRIDES)


def build_parser() -> argparse.ArgumentParser:
    """The ``engramlm`` parser: one subcommand per user task, help from the docstrings."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="engramlm", description=ABOUT, formatter_class=raw)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; tracebacks for errors"
    )
    parser.add_argument("--version", action="version", version=f"engramlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Any, schema: Schema | None = None, **kw: Any) -> Any:
        doc = " ".join(fn.__doc__.split())
        p = sub.add_parser(name, help=doc, description=doc, formatter_class=raw, **kw)
        p.set_defaults(fn=fn, overrides_schema=schema)
        return p

    p = command("train", cmd_train, TRAIN_OVERRIDES, epilog=_train_epilog())
    p.add_argument("--config", help="TOML file with [model] and [train] tables (recipes/*.toml)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    p = command("eval", cmd_eval)
    p.add_argument("--run", required=True, help="a run folder written by `engramlm train`")
    p.add_argument("--data", help="a text file/folder/.jsonl to score instead of the val split")
    p.add_argument("--max-batches", type=int, default=None, help="score at most this many")
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seed of the run's train/validation split, for runs whose config.json does not "
        "keep it (default: the one it keeps, else the training seed)",
    )
    p.add_argument(
        "--table-storage",
        choices=["device", "host", "disk"],
        help="where the Engram tables live while scoring (default: the run's table_storage)",
    )

    p = command("generate", cmd_generate)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run folder written by `engramlm train`")
    source.add_argument(
        "--model-dir",
        help="a transformers model folder with hashed n-gram tables and a tokenizer "
        "(Qwen4-Exp, engramlm exports); see README 'Running released Engram models'",
    )
    p.add_argument(
        "--engram-tables",
        choices=("host", "disk"),
        default="disk",
        help="--model-dir: where the n-gram tables live (disk: built once under --table-dir)",
    )
    p.add_argument("--table-dir", default=None, help="--model-dir: the disk tier's folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)

    from engramlm.compare import OVERRIDES as COMPARE_OVERRIDES

    p = command(
        "compare",
        cmd_compare,
        COMPARE_OVERRIDES,
        epilog="Override the models and schedule with --moe.FIELD, --engram.FIELD, --rho=R and "
        "--train.FIELD\n(fields as in `engramlm train --help`), e.g. --train.data=stdlib.",
    )
    p.add_argument("--out", default="runs/compare", help="folder for the runs and the table")
    p.add_argument("--steps", type=int, default=None, help="training steps per model")

    p = sub.add_parser("tables", help="move Engram tables out of and into a run's checkpoints")
    tables = p.add_subparsers(dest="tables_command", required=True, metavar="ACTION")
    p = tables.add_parser("export", help=cmd_tables_export.__doc__)
    p.add_argument("--run", required=True, help="a run folder written by `engramlm train`")
    p.add_argument("--out", required=True, help="a new folder for the disk tables")
    p.set_defaults(fn=cmd_tables_export, overrides_schema=None)
    p = tables.add_parser("import", help=cmd_tables_import.__doc__)
    p.add_argument("--tables", required=True, help="a folder of engram_layer<i> disk tables")
    p.add_argument("--run", required=True, help="a run folder written by `engramlm train`")
    p.add_argument(
        "--storage",
        choices=["device", "host", "disk"],
        help="how the checkpoint stores the tables (default: the run's table_storage)",
    )
    p.set_defaults(fn=cmd_tables_import, overrides_schema=None)

    from engramlm.experiments import EXPERIMENTS
    from engramlm.experiments.common import OVERRIDES as EXPERIMENT_OVERRIDES

    p = command(
        "experiment",
        cmd_experiment,
        EXPERIMENT_OVERRIDES,
        epilog="Override the base models and schedule with --moe.FIELD, --engram.FIELD and "
        "--train.FIELD\n(fields as in `engramlm train --help`), e.g. --train.steps=600.",
    )
    p.add_argument(
        "name",
        choices=[*EXPERIMENTS, "all", "report"],
        help="which experiment; `all` runs every one; `report` only rewrites the results page",
    )
    p.add_argument("--out", default="runs", help="results go to OUT/NAME/")
    p.add_argument("--scale", type=float, default=1.0, help="multiply training steps")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI): outputs only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=None, help="corpus (named or a path) instead of pydocs")
    p.add_argument(
        "--page",
        default="docs/results.md",
        help="results page rewritten after each experiment ('' = none)",
    )

    p = command("retrofit", cmd_retrofit, RETROFIT_OVERRIDES)
    p.add_argument("--model-dir", required=True, help="a local save_pretrained folder")
    p.add_argument("--out", required=True, help="folder for the Engram weights and report")
    p.add_argument("--data", default="pydocs", help="named corpus, text file/folder or .jsonl")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=20)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.overrides_schema is None:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if _rank() == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.fn(args, overrides)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        command = " ".join(c for c in (args.command, getattr(args, "tables_command", None)) if c)
        parser.exit(2, f"engramlm {command}: error: {message}\n")


if __name__ == "__main__":
    main()
