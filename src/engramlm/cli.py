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
field can be overridden with a dotted flag. Unknown keys are errors that list the known ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from engramlm.config import ModelConfig


def _parse_value(text: str) -> Any:
    """``--x=3`` -> 3, ``--x=[1,2]`` -> [1, 2], ``--x=true`` -> True, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.key[.sub]=value`` pairs into a nested dict (copied)."""
    tree = json.loads(json.dumps(tree))
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise SystemExit(f"error: expected --section.key=value, got {item!r}")
        key, value = item[2:].split("=", 1)
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"error: {key}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return tree


def load_configs(path: str | None, overrides: list[str]) -> tuple[ModelConfig, Any]:
    """A TOML file (or the built-in ``tiny`` model) plus overrides -> (ModelConfig, TrainConfig)."""
    from engramlm.train import TrainConfig

    tree: dict[str, Any] = {"model": ModelConfig.preset("tiny").to_dict(), "train": {}}
    if path is not None:
        file = Path(path)
        if not file.exists():
            raise SystemExit(f"error: config file {file} does not exist")
        loaded = tomllib.loads(file.read_text())
        unknown = set(loaded) - {"model", "train"}
        if unknown:
            raise SystemExit(
                f"error: {file}: unknown sections {sorted(unknown)}; use [model], [train]"
            )
        if "model" in loaded:
            tree["model"] = loaded["model"]
        tree["train"] = loaded.get("train", {})
    tree = apply_overrides(tree, overrides)
    unknown = set(tree) - {"model", "train"}
    if unknown:  # e.g. --steps=3 for --train.steps=3: would otherwise be silently ignored
        raise SystemExit(
            f"error: unknown sections {sorted(unknown)} in overrides; use --model.* or --train.*"
        )
    try:
        return ModelConfig.from_dict(tree["model"]), TrainConfig.from_dict(tree["train"])
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    """Train a model on real text (see engramlm.train); under torchrun, data-parallel with the
    Engram tables sharded across the ranks (engramlm.distributed)."""
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
    """Validation loss and bits per byte of a trained run, on its split or on a text file."""
    from engramlm.train import evaluate_run

    loss, bpb, tokens = evaluate_run(
        args.run, data=args.data, max_batches=args.max_batches, table_storage=args.table_storage
    )
    print(
        f"{args.data or 'validation split'}: loss {loss:.4f} nats, {bpb:.4f} bits/byte, "
        f"{tokens:,} tokens"
    )


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> None:
    """Continue a prompt with a trained run's model (--run), streaming the text as it comes, or
    with a released model's folder (--model-dir) whose n-gram tables stay on --engram-tables."""
    from engramlm.generate import generate_text

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    sys.stdout.write(args.prompt)
    if args.model_dir is not None:
        from engramlm.hf import generate_offloaded

        show(
            generate_offloaded(
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
        )
        sys.stdout.write("\n")
        return
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
    sys.stdout.write("\n")


def cmd_compare(args: argparse.Namespace, overrides: list[str]) -> None:
    """The main job: MoE baseline vs iso-parameter Engram vs dense iso-FLOP, same data/steps."""
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

    try:
        path = import_tables(args.run, args.tables, storage=args.storage)
    except (ValueError, FileNotFoundError) as e:  # TableFileError is a ValueError
        raise SystemExit(f"error: {e}") from e
    print(f"imported the tables of {args.tables} into {path}")


def cmd_retrofit(args: argparse.Namespace, overrides: list[str]) -> None:
    """Add Engram to a local Hugging Face model folder and train only Engram (engramlm.retrofit)."""
    from engramlm.retrofit import RETROFIT_TRAIN, retrofit_pretrained

    tree = apply_overrides({}, overrides)
    if set(tree) - {"engram"}:
        raise SystemExit(f"error: retrofit takes only --engram.* overrides, got {sorted(tree)}")
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


def cmd_experiment(args: argparse.Namespace, overrides: list[str]) -> None:
    """Run one of the paper's experiments in miniature (or `all`), writing runs/NAME/."""
    from engramlm.experiments import EXPERIMENTS, run_experiment

    settings = apply_overrides({}, overrides)  # --moe.* / --engram.* / --train.*
    from engramlm.experiments.report import write_page

    names = {"all": list(EXPERIMENTS), "report": []}.get(args.name, [args.name])
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="engramlm", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help=cmd_train.__doc__)
    p.add_argument("--config", help="TOML file with [model] and [train] tables")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help=cmd_eval.__doc__)
    p.add_argument("--run", required=True, help="a run directory written by `engramlm train`")
    p.add_argument("--data", help="a text file/folder/.jsonl to score instead of the val split")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument(
        "--table-storage",
        choices=["device", "host", "disk"],
        help="where the Engram tables live while scoring (default: the run's table_storage)",
    )
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help=cmd_generate.__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run directory written by `engramlm train`")
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
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("compare", help=cmd_compare.__doc__)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("tables", help="move Engram tables out of and into a run's checkpoints")
    tables = p.add_subparsers(dest="tables_command", required=True)
    p = tables.add_parser("export", help=cmd_tables_export.__doc__)
    p.add_argument("--run", required=True, help="a run directory written by `engramlm train`")
    p.add_argument("--out", required=True, help="a new folder for the disk tables")
    p.set_defaults(fn=cmd_tables_export)
    p = tables.add_parser("import", help=cmd_tables_import.__doc__)
    p.add_argument("--tables", required=True, help="a folder of engram_layer<i> disk tables")
    p.add_argument("--run", required=True, help="a run directory written by `engramlm train`")
    p.add_argument(
        "--storage",
        choices=["device", "host", "disk"],
        help="how the checkpoint stores the tables (default: the run's table_storage)",
    )
    p.set_defaults(fn=cmd_tables_import)

    from engramlm.experiments import EXPERIMENTS

    p = sub.add_parser("experiment", help=cmd_experiment.__doc__)
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
    p.set_defaults(fn=cmd_experiment)

    p = sub.add_parser("retrofit", help=cmd_retrofit.__doc__)
    p.add_argument("--model-dir", required=True, help="a local save_pretrained folder")
    p.add_argument("--out", required=True, help="folder for the Engram weights and report")
    p.add_argument("--data", default="pydocs", help="named corpus, text file/folder or .jsonl")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=20)
    p.set_defaults(fn=cmd_retrofit)

    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if _rank() == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args.fn(args, overrides)


if __name__ == "__main__":
    main()
