"""Is engramlm's Engram layer faster than transformers' Qwen4-Exp PLE layer (an Engram variant)?

Both layers get the same weights (the PLE layer mapped onto ``Engram`` as the Qwen4-Exp loader
does it) and the same inputs, and their outputs are checked equal before anything is timed.
Hashing is included on both sides (the PLE layer hashes inside its forward). Each is run the
way its users run it by default: eager modules, fp32, the PLE layer with transformers' own
cache for decoding, ours with its returned conv state and hashing prefix. Four races, each
interleaved in one process (medians over repeats, ratio = peer time / our time, > 1 is ahead):

- inference forward: ``torch.inference_mode``, [B, T] tokens;
- training forward: autograd recording (parameters and hidden state require grad);
- forward + backward: the training forward, then backward from a fixed upstream gradient;
- decode step: T = 1 with the state of a T-token prompt, under ``torch.inference_mode``
  (each timed call runs ``--decode-steps`` steps from a copy of the prompt's state).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers.py [--batch 8] [--seq 512] [--device cpu]

Runs on CUDA too (``--device cuda``, synchronising around every timed call) when a GPU exists.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, machine  # noqa: E402

from engramlm import qwen4_exp  # noqa: E402
from engramlm.engram import Engram  # noqa: E402
from engramlm.hashing import NgramHasher  # noqa: E402


def peer_layer(args: argparse.Namespace):  # -> Qwen4ExpTextPLELayer
    """One Qwen4-Exp PLE layer (layer 0, the first PLE layer) of the benchmark's shapes, its
    weights randomised (its own init leaves norms and conv at values that hide mistakes)."""
    from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpTextConfig
    from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextPLELayer

    config = Qwen4ExpTextConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        hc_count=args.streams,
        ple_layer_ids=[1],
        ple_embed_dim=args.memory,
        ngram_size=args.ngram,
        heads_per_ngram=args.heads // (args.ngram - 1),
        ngram_vocab_size_base=args.table_base,
        make_ngram_vocab_size_divisible_by=128,
        eos_token_id=0,
    )
    layer = Qwen4ExpTextPLELayer(config, layer_idx=0, ple_layer_index=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.02 if p.dim() < 3 else 0.3)
        layer.ple_embedding.ngram_embedding.weight.normal_(std=0.5)
    return layer, config


def engram_from_peer(peer, config) -> tuple[Engram, NgramHasher]:  # noqa: ANN001
    """Our Engram layer and hasher holding the PLE layer's weights, through the Qwen4-Exp loader
    (``engramlm.qwen4_exp``: keys and value stacked into ``kv_proj``, norm weights 1 + w, the
    conv kernel and the n-gram table copied as they are)."""
    ple = qwen4_exp.from_transformers_layer(peer, config)
    return ple.engram, ple.hasher


def assert_grads_close(mine: torch.Tensor, theirs: torch.Tensor) -> None:
    """Gradients agree: 99% of the entries to 1e-3 of the largest one, and the whole to 1% in
    norm. Not tighter, because near a gate score of 0 the signed square root's derivative
    1 / (2 sqrt|s|) is up to 500 (and jumps to 0 at the clamp |s| = 1e-6): the last bit of s,
    which differs between the two ways of computing it, moves such a position's gradient,
    and through the key and table gradients whole rows with it. A wrong weight or a missing
    term moves every entry."""
    close = torch.isclose(mine, theirs, rtol=1e-3, atol=1e-3 * theirs.abs().max().item())
    far = (~close).float().mean().item()
    relative = ((mine - theirs).norm() / theirs.norm()).item()
    if far > 1e-2 or relative > 1e-2:
        raise AssertionError(
            f"gradient {list(theirs.shape)}: {far:.2e} of the entries differ from the peer's, "
            f"relative difference in norm {relative:.2e}"
        )


def sync(device: torch.device) -> Callable[[Callable[[], object]], Callable[[], object]]:
    """Wrap a timed call so that it includes the device's queued work."""

    def wrap(fn: Callable[[], object]) -> Callable[[], object]:
        if device.type != "cuda":
            return fn

        def synced() -> object:
            out = fn()
            torch.cuda.synchronize(device)
            return out

        return synced

    return wrap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--memory", type=int, default=512, help="E, the n-gram embedding width")
    p.add_argument("--heads", type=int, default=16, help="H = (N-1)K hash heads")
    p.add_argument("--ngram", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--table-base", type=int, default=20_000, help="rows per head, pre-prime")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--decode-steps", type=int, default=200, help="decode steps per timed call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    from transformers import DynamicCache

    device = torch.device(args.device)
    timed = sync(device)
    torch.manual_seed(0)
    peer, config = peer_layer(args)
    ours, hasher = engram_from_peer(peer, config)
    peer, ours, hasher = peer.to(device), ours.to(device), hasher.to(device)
    B, T, M, D = args.batch, args.seq, args.streams, args.hidden
    ids = torch.randint(1, args.vocab, (B, T), device=device)
    ids[:, T // 3] = config.eos_token_id  # a document boundary: both restart the history there
    hidden = torch.randn(B, T, M * D, device=device)
    upstream = torch.randn(B, T, M * D, device=device)

    def run_ours(h: torch.Tensor) -> torch.Tensor:
        y, _ = ours(h.view(B, T, M, D), hasher(ids, 0))
        return y.flatten(-2)

    def run_peer(h: torch.Tensor) -> torch.Tensor:
        return peer(h, ids, None)

    # Equality first: outputs, then gradients of every mapped weight and of the hidden state.
    h_ours, h_peer = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    y_ours, y_peer = run_ours(h_ours), run_peer(h_peer)
    torch.testing.assert_close(y_ours, y_peer, rtol=1e-4, atol=1e-5)
    y_ours.backward(upstream)
    y_peer.backward(upstream)
    kv_grad = torch.cat([peer.key_proj.weight.grad, peer.value_proj.weight.grad])
    table_grad = peer.ple_embedding.ngram_embedding.weight.grad
    for mine, theirs in [
        (h_ours.grad, h_peer.grad),
        (ours.kv_proj.weight.grad, kv_grad),
        (ours.table.weight.grad, table_grad),
        (ours.short_conv.weight.grad, peer.conv1d.weight.grad),
    ]:
        assert_grads_close(mine, theirs)

    def zero_grads() -> None:
        for module in (peer, ours):
            for q in module.parameters():
                q.grad = None

    def inference(run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def fn() -> object:
            with torch.inference_mode():
                return run(hidden)

        return timed(fn)

    def train_forward(run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        h = hidden.clone().requires_grad_()
        return timed(lambda: run(h))

    def forward_backward(run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        h = hidden.clone().requires_grad_()

        def fn() -> object:
            zero_grads()
            h.grad = None
            run(h).backward(upstream)
            return h.grad

        return timed(fn)

    # Decode: a T-token prompt fills each side's state, then steps of one token each.
    step_ids = torch.randint(1, args.vocab, (args.decode_steps, B, 1), device=device)
    step_hidden = torch.randn(args.decode_steps, B, 1, M * D, device=device)

    def decode_ours() -> Callable[[], object]:
        with torch.inference_mode():
            _, conv_state = ours(hidden.view(B, T, M, D), hasher(ids, 0))
        prefix0, state0 = hasher.next_prefix(None, ids), conv_state

        def fn() -> object:
            prefix, state = prefix0, state0
            with torch.inference_mode():
                for s in range(args.decode_steps):
                    y, state = ours(
                        step_hidden[s].view(B, 1, M, D), hasher(step_ids[s], 0, prefix), state
                    )
                    prefix = hasher.next_prefix(prefix, step_ids[s])
            return y

        return fn

    def decode_peer() -> Callable[[], object]:
        cache0 = DynamicCache(config=config)
        with torch.inference_mode():
            peer(hidden, ids, cache0)

        def fn() -> object:
            cache = copy.deepcopy(cache0)  # the prompt's state: a few small tensors
            with torch.inference_mode():
                for s in range(args.decode_steps):
                    y = peer(step_hidden[s], step_ids[s], cache)
            return y

        return fn

    # Check decode equality: last step's output of both.
    torch.testing.assert_close(decode_ours()().flatten(-2), decode_peer()(), rtol=1e-4, atol=1e-5)

    races = {
        "inference forward": (inference(run_ours), inference(run_peer)),
        "training forward": (train_forward(run_ours), train_forward(run_peer)),
        "forward + backward": (forward_backward(run_ours), forward_backward(run_peer)),
    }
    load = os.getloadavg()[0]
    print(f"machine: {machine()}; load average {load:.1f} at start")
    print(
        f"Engram layer vs transformers Qwen4ExpTextPLELayer: B={B}, T={T}, D={D}, M={M} streams, "
        f"E={args.memory}, H={args.heads} heads, N={args.ngram}, {args.device}, hashing included"
    )
    for name, (fn_ours, fn_peer) in races.items():
        t = interleaved({"ours": fn_ours, "peer": fn_peer}, repeats=args.repeats)
        print(
            f"  {name:20s} ours {t['ours'] * 1e3:8.2f} ms   peer {t['peer'] * 1e3:8.2f} ms   "
            f"{t['peer'] / t['ours']:5.2f}x the peer"
        )
    t = interleaved(
        {"ours": timed(decode_ours()), "peer": timed(decode_peer())}, repeats=args.repeats
    )
    ours_step, peer_step = t["ours"] / args.decode_steps, t["peer"] / args.decode_steps
    print(
        f"  {'decode step (T=1)':20s} ours {ours_step * 1e3:8.3f} ms   "
        f"peer {peer_step * 1e3:8.3f} ms   {peer_step / ours_step:5.2f}x the peer"
    )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
