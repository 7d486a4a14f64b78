"""What issue 12's fixes changed in the demo's Engram model, one change at a time.

Trains ``make demo``'s Engram model (``engramlm compare`` defaults, rho = 0.75) with today's code
and with one fix undone at a time, same seed and batches:

- ``fixed``: the defaults (filler = the tokenizer's pad token, conv RMSNorm eps 1e-5);
- ``old-filler``: the n-gram filler raw id 2, the old default - the ordinary token "!" in our
  BPE, so every sequence start aliases real ("!", x) n-grams. ``train`` refuses that id now;
  this recipe lets it through on purpose (it replaces the check for its own runs only);
- ``old-conv-eps``: the short conv's RMSNorm with torch's default eps (float32 machine epsilon)
  instead of the demo's 1e-5.

The demo's own Engram row (``runs/compare``) is ``fixed`` at seed 0. One run takes ~3.5 min on
2 idle cores; results reproduce bitwise only at the same thread count.

    OMP_NUM_THREADS=1 .venv/bin/python recipes/filler_ablation.py [--variants old-filler]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import engramlm.train as train_module
from engramlm.compare import DEFAULT_ENGRAM, DEFAULT_MOE, DEFAULT_RHO, DEFAULT_TRAIN, build_models
from engramlm.data import prepare_corpus

VARIANTS = {
    "fixed": {},
    "old-filler": {"pad_id": 2},
    "old-conv-eps": {"conv_norm_eps": float(torch.finfo(torch.float32).eps)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="runs/filler_ablation")
    args = parser.parse_args()
    corpus = prepare_corpus(DEFAULT_TRAIN.data, vocab_size=DEFAULT_TRAIN.vocab_size)
    models = build_models(DEFAULT_MOE, DEFAULT_ENGRAM, DEFAULT_RHO, corpus.vocab_size)
    engram_model = next(cfg for name, cfg in models.items() if name.startswith("Engram"))
    checked = train_module.resolve_pad_id
    results = {}
    for name in args.variants.split(","):
        changes = VARIANTS[name]
        model = dataclasses.replace(
            engram_model, engram=dataclasses.replace(engram_model.engram, **changes)
        )
        if "pad_id" in changes:  # the old, unchecked filler: what every result before carried
            train_module.resolve_pad_id = lambda pad_id, *a, **k: pad_id
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = dataclasses.replace(DEFAULT_TRAIN, seed=seed, out_dir=f"{args.out}/{name}-{seed}")
            result = train_module.train(model, cfg, corpus=corpus, progress=False)
            results[f"{name}-seed{seed}"] = result.val_loss
            print(f"{name}, seed {seed}: val loss {result.val_loss:.4f}", flush=True)
        train_module.resolve_pad_id = checked
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
