"""How fast is our n-gram hashing, against the demo's per-forward numpy way?

Both compute the same rows (checked): B=8, T=4096, 2 Engram layers, demo-sized tables. The
numpy side is what the official demo does at every forward: hash on the host with numpy, then
copy into a tensor. Ours: torch on the ids' device, constants precomputed once.
Also: the Engram layer's forward+backward time relative to one attention+FFN block.

    .venv/bin/python benchmarks/hashing.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, machine  # noqa: E402

from engramlm import EngramConfig, NgramHasher, head_moduli, layer_multipliers  # noqa: E402


def numpy_demo_hash(
    ids: np.ndarray, cfg: EngramConfig, V: int, pad: int
) -> dict[int, torch.Tensor]:
    """The demo's algorithm as the demo runs it: per forward, numpy on host, every constant."""
    mods = head_moduli(
        layer_ids=cfg.layer_ids,
        table_sizes=cfg.table_sizes,
        heads_per_ngram=cfg.heads_per_ngram,
        max_ngram=cfg.max_ngram,
    )
    out = {}
    B, T = ids.shape
    for layer in cfg.layer_ids:
        mult = layer_multipliers(
            seed=cfg.seed, layer_id=layer, max_ngram=cfg.max_ngram, compressed_vocab_size=V
        )
        shifts = [
            np.pad(ids, ((0, 0), (k, 0)), constant_values=pad)[:, :T] for k in range(cfg.max_ngram)
        ]
        heads = []
        for n in range(2, cfg.max_ngram + 1):
            mix = shifts[0] * np.int64(mult[0])
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * np.int64(mult[k]))
            for j in range(cfg.heads_per_ngram):
                heads.append(mix % np.int64(mods[layer][(n - 2) * cfg.heads_per_ngram + j]))
        out[layer] = torch.from_numpy(np.stack(heads, axis=2))
    return out


def numpy_constants_cached(ids: np.ndarray, hasher: NgramHasher, cfg: EngramConfig, pad: int):
    """numpy with constants computed once (isolates the arithmetic from the prime search)."""
    out = {}
    B, T = ids.shape
    for layer in cfg.layer_ids:
        mult = getattr(hasher, f"mult_{layer}").numpy()
        mods = getattr(hasher, f"mod_{layer}").numpy()
        shifts = [
            np.pad(ids, ((0, 0), (k, 0)), constant_values=pad)[:, :T] for k in range(cfg.max_ngram)
        ]
        mixes, mix = [], shifts[0] * mult[0]
        for k in range(1, cfg.max_ngram):
            mix = np.bitwise_xor(mix, shifts[k] * mult[k])
            mixes.append(mix)
        per_head = np.repeat(np.stack(mixes, axis=-1), cfg.heads_per_ngram, axis=-1)
        out[layer] = torch.from_numpy(per_head % mods)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cfg = EngramConfig()  # demo: 2 layers, 646,400-row heads, N=3, K=8
    V, pad = 99_000, 2
    hasher = NgramHasher.from_config(
        cfg,
        pad_id=pad,
        compressed_vocab_size=V,
    )
    ids = torch.randint(0, V, (args.batch, args.seq))
    ids_np = ids.numpy()
    ours = hasher.all_layers(ids)
    for layer, rows in numpy_demo_hash(ids_np, cfg, V, pad).items():
        assert torch.equal(rows, ours[layer]), "numpy and torch hashing disagree"
    t = interleaved(
        {
            "numpy, demo (constants per forward)": lambda: numpy_demo_hash(ids_np, cfg, V, pad),
            "numpy, constants cached": lambda: numpy_constants_cached(ids_np, hasher, cfg, pad),
            "engramlm torch": lambda: hasher.all_layers(ids),
        },
        repeats=args.repeats,
    )
    print(f"machine: {machine()}")
    print(f"hashing B={args.batch} T={args.seq}, {len(cfg.layer_ids)} layers, H={cfg.num_heads}")
    base = t["engramlm torch"]
    for name, sec in t.items():
        print(f"  {name:38s} {sec * 1e3:9.1f} ms   {sec / base:6.2f}x engramlm")
    layer_vs_block(args)


def layer_vs_block(args: argparse.Namespace) -> None:
    """Engram layer forward+backward vs one attention+FFN block of the same width."""
    from engramlm.config import ModelConfig
    from engramlm.engram import Engram
    from engramlm.model import Block, rope_tables

    B, T, D = args.batch, min(args.seq, 1024), args.hidden
    cfg = EngramConfig(
        table_sizes=(100_003, 100_003), embed_dim_per_ngram=256, layer_ids=(1,), hc_mult=1
    )
    hasher = NgramHasher(
        seed=0,
        layer_ids=cfg.layer_ids,
        table_sizes=cfg.table_sizes,
        heads_per_ngram=cfg.heads_per_ngram,
        max_ngram=cfg.max_ngram,
        pad_id=0,
        compressed_vocab_size=50_000,
    )
    engram = Engram(cfg, D, hasher.moduli[1])
    heads = max(1, D // 64)
    mcfg = ModelConfig(
        hidden_size=D, num_heads=heads, num_kv_heads=heads, ffn_hidden_size=3 * D, max_seq_len=T
    )
    block = Block(mcfg, layer_id=0)
    cos, sin = rope_tables(mcfg.head_dim, T, mcfg.rope_theta)
    x = torch.randn(B, T, 1, D, requires_grad=True)
    hash_ids = hasher(torch.randint(0, 50_000, (B, T)), 1)

    def run_engram() -> None:
        y, _ = engram(x, hash_ids)
        y.sum().backward()

    def run_block() -> None:
        block(x, cos, sin).sum().backward()

    t = interleaved({"engram": run_engram, "block": run_block}, repeats=args.repeats)
    print(f"Engram layer (E={cfg.memory_dim}, H={cfg.num_heads}) fwd+bwd vs one attention+FFN")
    print(f"block (FFN {3 * D}), B={B} T={T} D={D}:")
    print(
        f"  engram {t['engram'] * 1e3:.1f} ms, block {t['block'] * 1e3:.1f} ms, "
        f"ratio {t['engram'] / t['block']:.2f}x"
    )


if __name__ == "__main__":
    main()
