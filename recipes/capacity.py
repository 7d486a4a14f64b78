"""Does the memory matter, or only Engram's dense projections? (issue 12, item 4)

The capacity part of ``engramlm experiment ablations`` on its own: the ablations' reference
Engram (the main job's model), the same model with its tables cut to 1/16 of the rows and to
the smallest tables the hash allows (a few rows per head), and the pure MoE, each trained at
every seed. Prints each variant's validation loss and the share of Engram's gain over the MoE it
keeps, ``(MoE - variant) / (MoE - reference)``, paired by seed. The runs are stored like the
experiments' (``runs/_models/<digest>``), so ``engramlm experiment ablations`` later reuses them.
Four models per seed, ~4 minutes each on 2 idle CPU cores.

    .venv/bin/python recipes/capacity.py [--seeds 0,1] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics

from engramlm.experiments import ablations
from engramlm.experiments.common import Context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--smoke", action="store_true", help="CI size: seconds, no findings")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    ctx = Context(name="ablations", seeds=tuple(seeds), smoke=args.smoke)
    configs = ablations.build_configs(ctx)

    def train(key: str, seed: int) -> dict[str, float]:
        result = ctx.train(f"{key}-seed{seed}", configs[key], ctx.train_config(seed=seed))
        return {"val_loss": result.val_loss}

    full = {s: train(ablations.FULL, s) for s in seeds}
    moe = {s: train(ablations.MOE, s) for s in seeds}
    capacity = ablations._capacity(configs, full, moe, seeds, train)
    print(json.dumps(capacity, indent=1))

    def fmt(values: list[float], digits: int = 4) -> str:
        cells = " / ".join(f"{v:.{digits}f}" for v in values)
        return f"{cells} (mean {statistics.fmean(values):.{digits}f})"

    print(f"\nseeds {seeds}; validation loss per seed")
    print(f"MoE (rho = 1):     {fmt(capacity['moe_val_loss'])}")
    print(
        f"Engram reference:  {fmt(capacity['full_val_loss'])}, "
        f"{capacity['full_table_rows']:,} table rows"
    )
    for row in capacity["variants"]:
        print(
            f"{row['label']}: {fmt(row['val_loss'])}, {row['table_rows']:,} rows; "
            f"share of the gain kept {fmt(row['gain_kept'], 2)}"
        )


if __name__ == "__main__":
    main()
