"""Hashing: bit-exact with the demo's algorithm (SPEC §2.2-2.3), pure, incremental."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from engramlm.hashing import (
    NgramHasher,
    check_ids,
    hash_ngrams,
    head_moduli,
    is_prime,
    layer_multipliers,
    ngram_hash,
)

HASH_FIELDS = (
    "seed",
    "layer_id",
    "layer_ids",
    "table_sizes",
    "heads_per_ngram",
    "max_ngram",
    "pad_id",
    "compressed_vocab_size",
)


def numpy_reference(ids: np.ndarray, mult: tuple[int, ...], mods: tuple[int, ...], pad: int):
    """The demo's way, written out plainly: numpy on the host, shift-pad, XOR, mod per head."""
    B, T = ids.shape
    N = len(mult)
    K = len(mods) // (N - 1)
    shifts = [np.pad(ids, ((0, 0), (k, 0)), constant_values=pad)[:, :T] for k in range(N)]
    out = []
    for n in range(2, N + 1):
        mix = shifts[0] * np.int64(mult[0])
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * np.int64(mult[k]))
        for j in range(K):
            out.append(mix % np.int64(mods[(n - 2) * K + j]))
    return np.stack(out, axis=2)


def test_hash_matches_demo_vectors(hash_vectors: list[dict]) -> None:
    for case in hash_vectors:
        cfg = case["config"]
        got = ngram_hash(torch.tensor(case["compressed_ids"]), **{k: cfg[k] for k in HASH_FIELDS})
        assert got.tolist() == case["expected_hash_ids"], case["name"]


def test_constants_match_demo_vectors(hash_vectors: list[dict]) -> None:
    for case in hash_vectors:
        cfg = case["config"]
        mult = layer_multipliers(
            seed=cfg["seed"],
            layer_id=cfg["layer_id"],
            max_ngram=cfg["max_ngram"],
            compressed_vocab_size=cfg["compressed_vocab_size"],
        )
        mods = head_moduli(
            layer_ids=cfg["layer_ids"],
            table_sizes=cfg["table_sizes"],
            heads_per_ngram=cfg["heads_per_ngram"],
            max_ngram=cfg["max_ngram"],
        )[cfg["layer_id"]]
        assert list(mult) == case["multipliers"], case["name"]
        assert list(mods) == case["head_moduli"], case["name"]


@pytest.mark.parametrize(
    "max_ngram,heads,layers", [(2, 1, (0,)), (3, 8, (1, 15)), (5, 3, (4, 2, 9))]
)
def test_torch_hash_matches_numpy_reference(max_ngram: int, heads: int, layers: tuple) -> None:
    V = 70_001
    sizes = tuple(1000 + 37 * n for n in range(max_ngram - 1))
    ids = torch.randint(0, V, (3, 41))
    all_mods = head_moduli(
        layer_ids=layers, table_sizes=sizes, heads_per_ngram=heads, max_ngram=max_ngram
    )
    for layer in layers:
        mult = layer_multipliers(
            seed=3, layer_id=layer, max_ngram=max_ngram, compressed_vocab_size=V
        )
        got = ngram_hash(
            ids,
            seed=3,
            layer_id=layer,
            layer_ids=layers,
            table_sizes=sizes,
            heads_per_ngram=heads,
            max_ngram=max_ngram,
            pad_id=5,
            compressed_vocab_size=V,
        )
        want = numpy_reference(ids.numpy(), mult, all_mods[layer], pad=5)
        np.testing.assert_array_equal(got.numpy(), want)


def test_every_head_of_every_layer_gets_a_distinct_prime() -> None:
    mods = head_moduli(
        layer_ids=(0, 3, 7), table_sizes=(500, 500, 90), heads_per_ngram=4, max_ngram=4
    )
    flat = [p for layer in mods.values() for p in layer]
    assert len(flat) == len(set(flat)) == 3 * 3 * 4
    assert all(is_prime(p) for p in flat)


def test_is_prime_agrees_with_trial_division() -> None:
    def slow(n: int) -> bool:
        return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))

    assert [n for n in range(3000) if is_prime(n)] == [n for n in range(3000) if slow(n)]
    assert is_prime(2_147_483_647) and not is_prime(2_147_483_649)


def test_multipliers_are_odd_and_cannot_overflow() -> None:
    for V in (2, 50, 129_280, 2**40):
        for m in layer_multipliers(seed=1, layer_id=2, max_ngram=4, compressed_vocab_size=V):
            assert m % 2 == 1 and m * (V - 1) < 2**63


def test_incremental_hashing_equals_full_hashing() -> None:
    hasher = NgramHasher(
        seed=0,
        layer_ids=(1, 4),
        table_sizes=(997, 1999, 503),
        heads_per_ngram=3,
        max_ngram=4,
        pad_id=0,
        compressed_vocab_size=300,
    )
    ids = torch.randint(0, 300, (2, 13))
    full = hasher.all_layers(ids)
    for split in ([1] * 13, [2, 5, 6], [13], [3, 1, 1, 8]):
        prefix, pieces, start = None, {1: [], 4: []}, 0
        for length in split:
            chunk = ids[:, start : start + length]
            for layer, rows in hasher.all_layers(chunk, prefix).items():
                pieces[layer].append(rows)
            prefix = hasher.next_prefix(prefix, chunk)
            start += length
        for layer in (1, 4):
            assert torch.equal(torch.cat(pieces[layer], dim=1), full[layer])


def test_short_sequence_is_padded_like_the_spec() -> None:
    """T < N: positions before the start hash as the pad id, exactly as a longer padded run."""
    kw = dict(
        seed=0,
        layer_id=1,
        layer_ids=(1,),
        table_sizes=(101, 103),
        heads_per_ngram=2,
        max_ngram=3,
        pad_id=7,
        compressed_vocab_size=20,
    )
    one = ngram_hash(torch.tensor([[4]]), **kw)
    padded = ngram_hash(torch.tensor([[7, 7, 4]]), **kw)
    assert torch.equal(one[0, 0], padded[0, 2])


def test_empty_batch_and_empty_sequence() -> None:
    hasher = NgramHasher(
        seed=0,
        layer_ids=(0,),
        table_sizes=(11, 13),
        heads_per_ngram=2,
        max_ngram=3,
        pad_id=0,
        compressed_vocab_size=10,
    )
    assert hasher(torch.zeros(0, 5, dtype=torch.long), 0).shape == (0, 5, 4)
    assert hasher(torch.zeros(2, 0, dtype=torch.long), 0).shape == (2, 0, 4)


def test_out_of_range_id_names_value_and_position() -> None:
    ids = torch.tensor([[1, 2, 3], [4, 50, 6]])
    with pytest.raises(ValueError, match=r"50 at position \(1, 1\).*\[0, 50\)"):
        check_ids(ids, 50)
    with pytest.raises(ValueError, match=r"-1 at position \(0, 0\)"):
        check_ids(torch.tensor([[-1]]), 50)


def test_wrong_dtype_is_refused() -> None:
    with pytest.raises(TypeError, match="int64"):
        check_ids(torch.tensor([[1.0, 2.0]]), 50)
    with pytest.raises(TypeError, match="int64"):
        check_ids(torch.tensor([[1, 2]], dtype=torch.int32), 50)


def test_bad_prefix_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        hash_ngrams(
            torch.tensor([[1, 2]]),
            torch.tensor([3, 5, 7]),
            torch.tensor([11, 13]),
            pad_id=0,
            prefix=torch.tensor([[1]]),
        )


def test_pad_id_must_be_a_compressed_id() -> None:
    with pytest.raises(ValueError, match="pad_id"):
        NgramHasher(
            seed=0,
            layer_ids=(0,),
            table_sizes=(11,),
            heads_per_ngram=1,
            max_ngram=2,
            pad_id=10,
            compressed_vocab_size=10,
        )


def test_hashing_is_deterministic_across_processes(hash_vectors: list[dict]) -> None:
    case = hash_vectors[1]
    code = (
        "import json,sys,torch; from engramlm.hashing import ngram_hash;"
        "c=json.loads(sys.argv[1]); cfg=c['config'];"
        f"keys={list(HASH_FIELDS)!r};"
        "print(json.dumps(ngram_hash(torch.tensor(c['compressed_ids']),"
        "**{k: cfg[k] for k in keys}).tolist()))"
    )
    import json

    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == case["expected_hash_ids"]


# --- variants: SplitMix64 multipliers, reset token, DEAD tokens -------------------------------


@pytest.mark.parametrize("seed,index,vocab,N", [(0, 0, 151_936, 3), (7, 2, 1000, 4), (0, 5, 5, 2)])
def test_splitmix64_multipliers_match_qwen4_exp(seed: int, index: int, vocab: int, N: int) -> None:
    """Against transformers' own Qwen4-Exp implementation (another code base)."""
    qwen = pytest.importorskip("transformers.models.qwen4_exp.modeling_qwen4_exp")
    theirs = qwen._build_layer_multipliers(vocab, N, index, seed).tolist()
    ours = layer_multipliers(
        seed=seed, layer_id=index, max_ngram=N, compressed_vocab_size=vocab, scheme="splitmix64"
    )
    assert list(ours) == theirs


def test_hasher_keys_layers_by_index_when_asked() -> None:
    kw = dict(seed=3, table_sizes=(101, 101), heads_per_ngram=2, max_ngram=3, pad_id=0)
    by_index = NgramHasher(
        layer_ids=(4, 9), compressed_vocab_size=50, hash_layer_key="layer_index", **kw
    )
    expected = layer_multipliers(seed=3, layer_id=1, max_ngram=3, compressed_vocab_size=50)
    assert by_index.mult_9.tolist() == list(expected)  # layer 9 is index 1


def blocked_reference(
    ids: list[int], mult: tuple[int, ...], mods: tuple[int, ...], pad: int, reset: int | None
) -> list[list[int]]:
    """Per position, per look-back, as the variants describe it: x_{t-k} is the pad when t-k < 0,
    when any position in [t-k, t-1] holds the reset token or DEAD (-1), and every slot is the
    pad when x_t itself is DEAD. Plain Python integers."""
    N, K = len(mult), len(mods) // (len(mult) - 1)
    out = []
    for t in range(len(ids)):
        toks = []
        for k in range(N):
            window = ids[t - k : t]
            stop = t - k < 0 or any(x == -1 or x == reset for x in window) or ids[t] == -1
            toks.append(pad if stop else ids[t - k])
        row = []
        for n in range(2, N + 1):
            mix = 0
            for k in range(n):
                mix ^= toks[k] * mult[k]
            row += [mix % mods[(n - 2) * K + j] for j in range(K)]
        out.append(row)
    return out


@pytest.mark.parametrize("reset,dead", [(5, False), (None, True), (5, True)])
def test_reset_and_dead_tokens_match_the_per_position_rule(reset: int | None, dead: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    mult = layer_multipliers(seed=0, layer_id=1, max_ngram=4, compressed_vocab_size=12)
    mods = head_moduli(layer_ids=(1,), table_sizes=(31, 37, 41), heads_per_ngram=2, max_ngram=4)[1]
    ids = torch.randint(0, 12, (3, 40), generator=gen)
    if dead:
        ids[torch.rand(3, 40, generator=gen) < 0.15] = -1
    got = hash_ngrams(
        ids, torch.tensor(mult), torch.tensor(mods), pad_id=2, reset_id=reset, dead=dead
    )
    for b in range(3):
        expected = blocked_reference(ids[b].tolist(), mult, mods, 2, reset)
        assert got[b].tolist() == expected


@pytest.mark.parametrize("reset,dead", [(5, False), (None, True)])
def test_chunked_hashing_with_blocking_equals_one_pass(reset: int | None, dead: bool) -> None:
    hasher = NgramHasher(
        seed=0, layer_ids=(1,), table_sizes=(31, 37), heads_per_ngram=2, max_ngram=3, pad_id=2,
        compressed_vocab_size=12, reset_id=reset, dead=dead,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 12, (2, 23), generator=gen)
    if dead:
        ids[torch.rand(2, 23, generator=gen) < 0.2] = -1
    whole = hasher(ids, 1)
    prefix, parts = None, []
    for chunk in ids.split([7, 1, 1, 9, 5], dim=1):
        parts.append(hasher(chunk, 1, prefix))
        prefix = hasher.next_prefix(prefix, chunk)
    assert torch.equal(torch.cat(parts, dim=1), whole)


def test_without_reset_or_dead_blocking_changes_nothing() -> None:
    mult = torch.tensor(layer_multipliers(seed=0, layer_id=1, max_ngram=3, compressed_vocab_size=9))
    mods = torch.tensor(
        head_moduli(layer_ids=(1,), table_sizes=(31, 37), heads_per_ngram=2, max_ngram=3)[1]
    )
    ids = torch.randint(0, 9, (2, 17))
    plain = hash_ngrams(ids, mult, mods, pad_id=1)
    assert torch.equal(hash_ngrams(ids, mult, mods, pad_id=1, dead=True), plain)
