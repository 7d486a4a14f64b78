"""DeepSeek-V4.1-Flash's Engram against an independent implementation of DEEPSEEK_V41_ENGRAM.md.

The reference here is written from the spec text with plain Python ints and explicit float32
arithmetic (fp8 and E8M0 decoded from their bits, not by torch's casts); it shares no code with
engramlm. The checkpoints are written by the tests in V4.1's format: real tensor names and
dtypes (F8_E4M3 tables and wkv, F8_E8M0 scales, BF16 q/k weights), several shards with an index,
``config.json`` in either spelling, small dims.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engramlm import EngramConfig
from engramlm.deepseek_v41 import DeepSeekV41Config, load_engram
from engramlm.hashing import layer_multipliers
from engramlm.tables import MemoryStore, OffloadedTable, TableAdam, disk_table, fp8
from engramlm.tokenization import CompressedVocab

DEAD = -1

# --- released constants (spec §3.1-3.3) ------------------------------------------------------
RELEASED_PRIMES = {
    1: [
        [16000057, 16000079, 16000081, 16000097, 16000121, 16000129, 16000133, 16000183],
        [16000189, 16000207, 16000211, 16000253, 16000277, 16000289, 16000307, 16000321],
        [16000339, 16000381, 16000393, 16000399, 16000403, 16000409, 16000447, 16000463],
    ],
    14: [
        [16000477, 16000487, 16000499, 16000507, 16000511, 16000573, 16000609, 16000627],
        [16000667, 16000669, 16000693, 16000697, 16000711, 16000729, 16000759, 16000769],
        [16000781, 16000799, 16000813, 16000819, 16000841, 16000877, 16000879, 16000889],
    ],
}
RELEASED_ROWS = {1: 384006168, 14: 384016682}
RELEASED_OFFSETS_LAYER14_TAIL = [320013196, 336014037, 352014914, 368015793]
RELEASED_MULTIPLIERS = {
    1: (76632096046245, 4839876093313, 35959672319349, 73987337458391),
    14: (67716810739261, 51510806800915, 30921347202721, 82619226485591),
}
RELEASED_HF_CONFIG = {
    "architectures": ["DeepseekV41ForCausalLM"],
    "text_config": {
        "engram_layer_ids": [1, 14],
        "engram_num_embeddings": [384006168, 384016682],
        "engram_max_ngram_size": 4,
        "engram_vocab_size": 16000000,
        "engram_n_heads": 8,
        "engram_head_dim": 256,
        "engram_pad_token_id": 2,
        "engram_compressed_vocab_size": 99092,
        "hc_mult": 4,
        "hidden_size": 5120,
        "rms_norm_eps": 1e-20,
        "hc_eps": 1e-6,
    },
}


# --- the independent reference ---------------------------------------------------------------
def ref_is_prime(n: int) -> bool:  # trial division: slow, obviously right
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def ref_primes(layer_ids, vocab_size, max_ngram, n_heads):  # spec §3.1
    used: set[int] = set()
    out = {}
    for layer in layer_ids:
        orders = []
        for _ in range(2, max_ngram + 1):
            cur, heads = vocab_size - 1, []
            for _ in range(n_heads):
                cur += 1
                while not ref_is_prime(cur) or cur in used:
                    cur += 1
                used.add(cur)
                heads.append(cur)
            orders.append(heads)
        out[layer] = orders
    return out


def ref_multipliers(layer_id, max_ngram, vc):  # spec §3.3
    bound = max(1, ((2**63 - 1) // vc) // 2)
    r = np.random.default_rng(10007 * layer_id).integers(0, bound, size=max_ngram, dtype=np.int64)
    return [2 * int(x) + 1 for x in r]


def ref_hash(seq, primes, mults, pad_c):  # spec §3.4-3.5: one sequence -> [T][n_cols] rows
    flat = [p for order in primes for p in order]
    offsets = [sum(flat[:c]) for c in range(len(flat))]
    N = len(mults)
    out = []
    for p in range(len(seq)):
        blocked, toks = False, []
        for k in range(N):
            src = seq[p - k] if p - k >= 0 else DEAD
            blocked = blocked or p < k or src == DEAD
            toks.append(pad_c if blocked else src)
        prods = [t * m for t, m in zip(toks, mults, strict=True)]
        acc, row = prods[0], []
        for n in range(2, N + 1):
            acc ^= prods[n - 1]
            for h, prime in enumerate(primes[n - 2]):
                row.append(acc % prime + offsets[(n - 2) * len(primes[0]) + h])
        out.append(row)
    return out


def ref_fp8(byte: int) -> float:  # e4m3fn from its bits (spec §4)
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 0xF, byte & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return sign * m / 8 * 2.0**-6
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def ref_e8m0(byte: int) -> float:
    return math.nan if byte == 255 else 2.0 ** (byte - 127)


FP8_LUT = torch.tensor([ref_fp8(b) for b in range(256)], dtype=torch.float64)
E8M0_LUT = torch.tensor([ref_e8m0(b) for b in range(256)], dtype=torch.float64)


def ref_dequant_rows(w_bytes, s_bytes):  # [n, dim] u8, [n, dim/32] u8 -> float32
    s = E8M0_LUT[s_bytes.long()].repeat_interleave(32, dim=1)
    return (FP8_LUT[w_bytes.long()] * s).float()


def ref_dequant_blocks(w_bytes, s_bytes):  # [R, C] u8, 32x32 block scales -> float32
    R, C = w_bytes.shape
    s = E8M0_LUT[s_bytes.long()].repeat_interleave(32, 0)[:R].repeat_interleave(32, 1)[:, :C]
    return (FP8_LUT[w_bytes.long()] * s).float()


def ref_forward(h, rows, ck, mask):  # spec §4-5; h [B,T,M,D] bf16, rows [B,T,n_cols] global ids
    B, T, M, D = h.shape
    table = ref_dequant_rows(ck["embed_w"], ck["embed_s"])  # [N, E] fp32
    e = table[rows].to(torch.bfloat16).flatten(-2)  # rows cast to bf16 (REF)
    W = ref_dequant_blocks(ck["wkv_w"], ck["wkv_s"]).to(torch.bfloat16)
    kv = (e.float() @ W.float().T).to(torch.bfloat16)  # fp32 accumulation, bf16 out
    key = kv[..., : M * D].reshape(B, T, M, D).float()
    value = kv[..., M * D :].float()  # [B, T, D]
    w = ck["q"].float() * ck["k"].float()  # [M, D]
    hf = h.float()
    eps = 1e-20
    r = torch.rsqrt(hf.pow(2).mean(-1) + eps) * torch.rsqrt(key.pow(2).mean(-1) + eps)
    dot = (hf * w * key).sum(-1) * r / math.sqrt(D)  # [B, T, M]
    gate = torch.sigmoid(torch.copysign(dot.abs().clamp_min(1e-6).sqrt(), dot))
    gate = gate * mask[:, :, None].float()
    return (hf + gate[..., None] * value[:, :, None, :]).to(torch.bfloat16)


# --- small V4.1-format checkpoints -----------------------------------------------------------
SMALL = dict(
    layer_ids=[1, 14], max_ngram=4, vocab_size=1000, n_heads=8, head_dim=64, pad=2, vc=500,
    hc=4, D=64,
)  # fmt: skip


def write_checkpoint(
    path: Path,
    *,
    spelling: str = "hf",
    seed: int = 0,
    drop: str | None = None,
    name_prefix: str = "",
    **changes,
) -> dict:
    """A V4.1-format checkpoint in three shards + index; -> its tensors (uint8 bytes) by layer."""
    c = {**SMALL, **changes}
    g = torch.Generator().manual_seed(seed)
    primes = ref_primes(c["layer_ids"], c["vocab_size"], c["max_ngram"], c["n_heads"])
    rows = [sum(sum(o) for o in primes[layer]) for layer in c["layer_ids"]]
    n_cols = (c["max_ngram"] - 1) * c["n_heads"]
    E, M, D = c["head_dim"], c["hc"], c["D"]

    def fp8_bytes(*shape):  # random e4m3 bit patterns, NaN patterns replaced by 0
        b = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        return b.masked_fill((b & 0x7F) == 0x7F, 0)

    tensors, record = {}, {}
    for layer, n in zip(c["layer_ids"], rows, strict=True):
        ck = {
            "embed_w": fp8_bytes(n, E),
            "embed_s": torch.randint(116, 122, (n, E // 32), generator=g, dtype=torch.uint8),
            "wkv_w": fp8_bytes((M + 1) * D, n_cols * E),
            "wkv_s": torch.randint(
                112, 117, (-(-(M + 1) * D // 32), -(-n_cols * E // 32)), generator=g
            ).to(torch.uint8),
            "q": (1 + 0.5 * torch.randn(M, D, generator=g)).to(torch.bfloat16),
            "k": (1 + 0.5 * torch.randn(M, D, generator=g)).to(torch.bfloat16),
        }
        record[layer] = ck
        prefix = f"{name_prefix}layers.{layer}.engram."
        tensors[prefix + "embed.weight"] = ck["embed_w"].view(torch.float8_e4m3fn)
        tensors[prefix + "embed.scale"] = ck["embed_s"].view(torch.float8_e8m0fnu)
        tensors[prefix + "wkv.weight"] = ck["wkv_w"].view(torch.float8_e4m3fn)
        tensors[prefix + "wkv.scale"] = ck["wkv_s"].view(torch.float8_e8m0fnu)
        tensors[prefix + "q_weight"] = ck["q"]
        tensors[prefix + "k_weight"] = ck["k"]
    tensors["embed.weight"] = torch.randn(8, D).to(torch.bfloat16)  # a non-Engram tensor
    if drop is not None:
        del tensors[drop]
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, members in shards.items():
        save_file({k: tensors[k].contiguous() for k in members}, str(path / shard))
        weight_map.update(dict.fromkeys(members, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fields = {
        "engram_layer_ids": c["layer_ids"],
        "engram_num_embeddings": rows,
        "engram_max_ngram_size": c["max_ngram"],
        "engram_vocab_size": c["vocab_size"],
        "engram_n_heads": c["n_heads"],
        "engram_head_dim": E,
        "engram_compressed_vocab_size": c["vc"],
        "hc_mult": M,
    }
    if spelling == "hf":
        config = {"text_config": {**fields, "engram_pad_token_id": c["pad"], "hidden_size": D,
                                  "rms_norm_eps": 1e-20}}  # fmt: skip
    else:  # REF's ModelArgs
        config = {**fields, "engram_pad_id": c["pad"], "dim": D, "norm_eps": 1e-20}
    (path / "config.json").write_text(json.dumps(config))
    return {
        "layers": record,
        "primes": primes,
        "rows": dict(zip(c["layer_ids"], rows, strict=True)),
        **c,
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("v41")
    return path, write_checkpoint(path)


def random_ids(g, B, T, vc, dead_rate=0.15):
    ids = torch.randint(0, vc, (B, T), generator=g)
    dead = torch.rand(B, T, generator=g) < dead_rate
    return ids, dead


def ref_rows(info, layer, ids, dead):
    mults = ref_multipliers(layer, info["max_ngram"], info["vc"])
    seqs = ids.masked_fill(dead, DEAD).tolist()
    return torch.tensor([ref_hash(s, info["primes"][layer], mults, info["pad"]) for s in seqs])


# --- released config ---------------------------------------------------------------------------
def test_released_primes_sum_to_released_row_counts():
    config = DeepSeekV41Config.from_json(RELEASED_HF_CONFIG)
    for layer, orders in RELEASED_PRIMES.items():
        flat = [p for order in orders for p in order]
        assert config.moduli[layer] == tuple(flat)
        assert sum(flat) == RELEASED_ROWS[layer]


def test_released_offsets_are_prefix_sums_of_each_layer():
    config = DeepSeekV41Config()
    offsets = (torch.tensor([0, *config.moduli[14][:-1]]).cumsum(0)).tolist()
    assert offsets[0] == 0 and offsets[-4:] == RELEASED_OFFSETS_LAYER14_TAIL


def test_released_multipliers_are_reproduced():
    for layer, expected in RELEASED_MULTIPLIERS.items():
        got = layer_multipliers(seed=0, layer_id=layer, max_ngram=4, compressed_vocab_size=99092)
        assert got == expected


def test_preset_is_the_released_config():
    config = DeepSeekV41Config.from_json(RELEASED_HF_CONFIG)
    assert config.engram == EngramConfig.preset("deepseek-v4.1-flash")
    e = config.engram
    assert EngramConfig.from_dict(e.to_dict()) == e
    assert (e.num_heads, e.head_dim, e.bias, e.short_conv, e.gate_fp32) == (
        24,
        256,
        False,
        False,
        True,
    )


def test_config_reads_either_spelling(tmp_path):
    write_checkpoint(tmp_path / "hf", spelling="hf")
    write_checkpoint(tmp_path / "ref", spelling="ref")
    assert DeepSeekV41Config.load(tmp_path / "hf") == DeepSeekV41Config.load(tmp_path / "ref")


def test_config_refuses_rows_that_are_not_the_prime_sum():
    raw = json.loads(json.dumps(RELEASED_HF_CONFIG))
    raw["text_config"]["engram_num_embeddings"] = [384006168, 384016681]
    with pytest.raises(ValueError, match="engram_num_embeddings for layer 14 is 384016681"):
        DeepSeekV41Config.from_json(raw)


def test_config_names_missing_fields():
    raw = {"text_config": {k: v for k, v in RELEASED_HF_CONFIG["text_config"].items()
                           if k != "engram_head_dim"}}  # fmt: skip
    with pytest.raises(ValueError, match="engram_head_dim"):
        DeepSeekV41Config.from_json(raw)


def test_small_config_primes_match_independent_search(ckpt):
    path, info = ckpt
    config = DeepSeekV41Config.load(path)
    for layer in info["layer_ids"]:
        assert config.moduli[layer] == tuple(p for o in info["primes"][layer] for p in o)


def test_wrong_compressed_vocab_size_is_refused(ckpt):
    path, _ = ckpt
    vocab = CompressedVocab.identity(499)
    with pytest.raises(ValueError, match="every table row would move"):
        load_engram(path, vocab=vocab)


# --- fp8 -----------------------------------------------------------------------------------
def test_fp8_rows_dequantize_exactly_as_their_bits_say():
    values = torch.arange(256, dtype=torch.uint8).repeat(256, 1)  # every e4m3 byte ...
    scales = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, 8)  # ... x every E8M0 byte
    packed = fp8.pack_rows(values.view(fp8.FP8), scales.view(fp8.E8M0))
    got = fp8.dequantize_rows(packed, 256)
    torch.testing.assert_close(
        got, ref_dequant_rows(values, scales), rtol=0, atol=0, equal_nan=True
    )


def test_wkv_block_scales_dequantize_exactly():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 256, (70, 45), generator=g, dtype=torch.uint8)
    s = torch.randint(100, 140, (3, 2), generator=g, dtype=torch.uint8)
    got = fp8.dequantize_blocks(w.view(fp8.FP8), s.view(fp8.E8M0))
    torch.testing.assert_close(got, ref_dequant_blocks(w, s), rtol=0, atol=0, equal_nan=True)


def test_fp8_tables_refuse_training(tmp_path):
    table = OffloadedTable(MemoryStore(64, 32, dtype=fp8.FP8))
    with pytest.raises(TypeError, match="read-only"):
        TableAdam([table])
    with pytest.raises(TypeError, match="read-only"):
        table.write_rows(torch.tensor([0]), torch.zeros(1, 32))
    disk = disk_table(tmp_path / "t", 64, 32, cache_bytes=1 << 16, dtype=fp8.FP8)
    with pytest.raises(TypeError, match="read-only"):
        disk.weight_store.write(torch.tensor([0]), torch.zeros(1, 32))
    disk.close()


def test_disk_fp8_table_keeps_fp8_bytes_on_disk(ckpt, tmp_path):
    path, info = ckpt
    load_engram(path, tables="disk", table_dir=tmp_path)
    for layer, rows in info["rows"].items():
        file = tmp_path / f"engram_layer{layer}" / "weight.engt"
        assert file.stat().st_size == 4096 + rows * (64 + 2)  # 64 fp8 values + 2 scale bytes


# --- hash ----------------------------------------------------------------------------------
def test_hash_ids_match_reference_with_dead_tokens(ckpt):
    path, info = ckpt
    modules = load_engram(path)
    g = torch.Generator().manual_seed(2)
    ids, dead = random_ids(g, 3, 40, info["vc"])
    dead[0, :3] = True  # DEAD at the sequence start
    dead[1, 10:14] = True  # a run of DEAD
    for layer, module in modules.items():
        got = module.hash_ids(ids, dead)
        assert torch.equal(got, ref_rows(info, layer, ids, dead))
        assert int(got.max()) < info["rows"][layer]


def test_dead_ids_given_as_minus_one_equal_the_dead_mask(ckpt):
    path, info = ckpt
    module = load_engram(path)[14]
    g = torch.Generator().manual_seed(3)
    ids, dead = random_ids(g, 2, 16, info["vc"])
    assert torch.equal(module.hash_ids(ids, dead), module.hash_ids(ids.masked_fill(dead, DEAD)))


# --- forward -------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_forward_matches_reference_within_bf16(ckpt, tmp_path, tier):
    path, info = ckpt
    modules = load_engram(path, tables=tier, table_dir=tmp_path if tier == "disk" else None)
    g = torch.Generator().manual_seed(4)
    ids, dead = random_ids(g, 2, 24, info["vc"])
    h = torch.randn(2, 24, info["hc"], info["D"], generator=g).to(torch.bfloat16)
    for layer, module in modules.items():
        module.reset()
        got = module(h, ids, dead)
        ck = info["layers"][layer]
        want = ref_forward(h, ref_rows(info, layer, ids, dead), ck, ~dead)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want)  # bf16 tolerances
        assert not torch.equal(got, h)  # Engram did add something


def test_dead_positions_leave_streams_unchanged(ckpt):
    path, info = ckpt
    module = load_engram(path)[1]
    g = torch.Generator().manual_seed(5)
    ids, dead = random_ids(g, 2, 20, info["vc"], dead_rate=0.4)
    h = torch.randn(2, 20, info["hc"], info["D"], generator=g).to(torch.bfloat16)
    out = module(h, ids, dead)
    assert torch.equal(out[dead], h[dead])
    assert not torch.equal(out[~dead], h[~dead])


@pytest.fixture
def one_thread():
    """Bitwise equality of a chunked and a whole prefill holds at a fixed GEMM reduction order:
    at two threads the GEMMs of an 8-token chunk and of all 23 tokens split their work
    differently (2 of 11,776 bf16 outputs then differ by one ulp on a 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_chunked_prefill_and_decode_equal_one_prefill(ckpt, one_thread):
    path, info = ckpt
    module = load_engram(path)[14]
    g = torch.Generator().manual_seed(6)
    ids, dead = random_ids(g, 2, 23, info["vc"])
    dead[:, 7] = True  # DEAD just before a chunk boundary blocks look-backs across it
    h = torch.randn(2, 23, info["hc"], info["D"], generator=g).to(torch.bfloat16)
    module.reset()
    whole_ids = module.hash_ids(ids, dead)
    whole = module(h, ids, dead)
    module.reset()
    pieces, rows = [], []
    for start, stop in [(0, 8), (8, 9), (9, 17), *[(t, t + 1) for t in range(17, 23)]]:
        rows.append(module.hash_ids(ids[:, start:stop], dead[:, start:stop]))
        pieces.append(module(h[:, start:stop], ids[:, start:stop], dead[:, start:stop]))
    assert torch.equal(torch.cat(rows, dim=1), whole_ids)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=0)
    assert module.length == 23


def test_decode_state_lives_in_the_callers_history(ckpt):
    """Histories passed as ``state=`` (what a generation cache holds) keep two interleaved batches
    apart, follow beam reordering and rewinds, and leave the module's own history alone."""
    from engramlm.deepseek_v41 import V41History

    path, info = ckpt
    module = load_engram(path)[14]
    g = torch.Generator().manual_seed(8)
    ids, dead = random_ids(g, 3, 12, info["vc"])
    h = torch.randn(3, 12, info["hc"], info["D"], generator=g).to(torch.bfloat16)
    module.reset()
    whole = module(h, ids, dead)  # the reference: one prefill on the module's own history
    a, b = V41History(), V41History()
    parts_a, parts_b = [], []
    for start, stop in [(0, 5), (5, 6), (6, 12)]:  # two sequence batches, steps interleaved
        s = slice(start, stop)
        parts_a.append(module(h[:, s], ids[:, s], dead[:, s], state=a))
        parts_b.append(module(h[1:, s], ids[1:, s], dead[1:, s], state=b))
    assert torch.equal(torch.cat(parts_a, 1), whole)
    assert torch.equal(torch.cat(parts_b, 1), whole[1:])
    assert module.length == 12 and a.length == b.length == 12
    # beams: rows reordered after position 8, then one more step = the reordered prefill
    beams = torch.tensor([2, 2, 0])
    c = V41History()
    module(h[:, :8], ids[:, :8], dead[:, :8], state=c)
    c.reorder(beams)
    step = module(h[beams, 8:9], ids[beams, 8:9], dead[beams, 8:9], state=c)
    module.reset()
    assert torch.equal(step, module(h[beams, :9], ids[beams, :9], dead[beams, :9])[:, 8:])
    # rewind: crop to 4 positions, continue from there = a prefill of the first 4 + the rest
    c.crop(4)
    assert c.length == 4
    rest = module(h[beams, 4:7], ids[beams, 4:7], dead[beams, 4:7], state=c)
    assert torch.equal(
        rest, module(h[beams, :7], ids[beams, :7], dead[beams, :7], start_pos=0)[:, 4:]
    )
    with pytest.raises(ValueError, match="crop length must be >= 0"):
        c.crop(-1)


def test_start_pos_zero_starts_a_new_sequence(ckpt):
    path, info = ckpt
    module = load_engram(path)[1]
    g = torch.Generator().manual_seed(7)
    ids, _ = random_ids(g, 1, 10, info["vc"])
    first = module.hash_ids(ids)
    module(torch.zeros(1, 10, info["hc"], info["D"], dtype=torch.bfloat16), ids)
    assert not torch.equal(module.hash_ids(ids), first)  # continues the sequence
    assert torch.equal(module.hash_ids(ids, start_pos=0), first)


def test_tiers_serve_identical_rows(ckpt, tmp_path):
    path, info = ckpt
    device = load_engram(path)[14].engram.table
    host = load_engram(path, tables="host")[14].engram.table
    disk = load_engram(path, tables="disk", table_dir=tmp_path, cache_mb=1)[14].engram.table
    rows = torch.randint(0, info["rows"][14], (500,), generator=torch.Generator().manual_seed(8))
    want = ref_dequant_rows(info["layers"][14]["embed_w"], info["layers"][14]["embed_s"])[rows]
    for table in (device, host, disk, disk):  # disk twice: from the file, then from its cache
        assert torch.equal(table.lookup(rows), want)
    stats = disk.weight_store.stats()
    assert stats["hits"] > 0 and stats["misses"] > 0  # both paths were taken


# --- bad checkpoints -----------------------------------------------------------------------
def test_missing_tensor_is_named(tmp_path):
    write_checkpoint(tmp_path, drop="layers.14.engram.k_weight")
    with pytest.raises(ValueError, match=r"missing tensor layers\.14\.engram\.k_weight"):
        load_engram(tmp_path)


def test_scales_of_the_wrong_layout_are_refused(tmp_path):
    info = write_checkpoint(tmp_path)
    shard = next(tmp_path.glob("*.safetensors"))  # rewrite one layer's scale as [N, 1]
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    name = next(k for k in tensors if k.endswith("embed.scale"))
    layer = int(name.split(".")[1])
    tensors[name] = torch.full((info["rows"][layer], 1), 127, dtype=torch.uint8).view(
        torch.float8_e8m0fnu
    )
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=rf"{name} .* is F8_E8M0 \[\d+, 1\], expected F8_E8M0"):
        load_engram(tmp_path)


def test_wrong_dtype_is_refused(tmp_path):
    write_checkpoint(tmp_path)
    shard = next(p for p in tmp_path.glob("*.safetensors"))
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    name = next(k for k in tensors if k.endswith("q_weight") or k.endswith("wkv.weight"))
    tensors[name] = tensors[name].float()
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=rf"{name} .* is F32"):
        load_engram(tmp_path)


def test_truncated_shard_is_refused_and_nothing_is_written(tmp_path):
    write_checkpoint(tmp_path / "ck")
    shard = max((tmp_path / "ck").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        load_engram(tmp_path / "ck", tables="disk", table_dir=tmp_path / "tables")
    assert not (tmp_path / "tables").exists() or not any((tmp_path / "tables").iterdir())


def test_complete_disk_tables_are_served_again_without_copying(ckpt, tmp_path):
    path, info = ckpt
    first = load_engram(path, tables="disk", table_dir=tmp_path)
    for module in first.values():
        module.engram.table.close()
    file = tmp_path / "engram_layer1" / "weight.engt"
    before = file.stat().st_mtime_ns
    again = load_engram(path, tables="disk", table_dir=tmp_path)
    assert file.stat().st_mtime_ns == before  # not rewritten
    rows = torch.randint(0, info["rows"][1], (300,), generator=torch.Generator().manual_seed(12))
    want = ref_dequant_rows(info["layers"][1]["embed_w"], info["layers"][1]["embed_s"])[rows]
    assert torch.equal(again[1].engram.table.lookup(rows), want)


def test_incomplete_or_foreign_disk_tables_are_refused_and_kept(ckpt, tmp_path):
    path, _ = ckpt
    for module in load_engram(path, tables="disk", table_dir=tmp_path).values():
        module.engram.table.close()
    other = tmp_path / "other"
    write_checkpoint(other, seed=1)  # same layout, other bytes
    with pytest.raises(FileExistsError, match="not complete tables of this checkpoint"):
        load_engram(other, tables="disk", table_dir=tmp_path)
    (tmp_path / "engram_layer14" / "source.json").unlink()  # as after an interrupted copy
    with pytest.raises(FileExistsError, match=r"engram_layer14'\]"):
        load_engram(path, tables="disk", table_dir=tmp_path)
    assert (tmp_path / "engram_layer14" / "weight.engt").exists()  # refused, not deleted


def test_compressed_ids_out_of_range_are_refused(ckpt):
    path, info = ckpt
    module = load_engram(path)[1]
    with pytest.raises(ValueError, match=r"outside \[0, 500\)"):
        module.hash_ids(torch.tensor([[3, 500]]))


# --- tokenizer compression (spec §2) -----------------------------------------------------------
def ref_normalize(text: str) -> str:  # spec §2's normalizer sequence, in plain Python
    import re
    import unicodedata

    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(ch for ch in s if unicodedata.category(ch) != "Mn").lower()
    s = re.sub(r"[ \t\r\n]+", " ", s)
    return " " if s == " " else s.strip()


@pytest.fixture(scope="module")
def byte_bpe():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte = pre_tokenizers.ByteLevel.alphabet()
    extra = ["Ġa", "ĠA", "ĠAPPLE", "Ġapple", "apple", "Ã©", "Ċ", "ĊĊ", "ĠĠ", "caf", "cafÃ©"]
    vocab = {tok: i for i, tok in enumerate(sorted(byte) + extra)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<pad>", special=True)])
    return tok


def test_compressed_vocab_is_the_spec_construction(byte_bpe):
    keys: dict[str, int] = {}
    expected = []
    for t in range(byte_bpe.get_vocab_size(with_added_tokens=True)):
        text = byte_bpe.decode([t], skip_special_tokens=False)
        key = byte_bpe.id_to_token(t) if "\ufffd" in text else (ref_normalize(text) or text)
        expected.append(keys.setdefault(key, len(keys)))
    vocab = CompressedVocab.from_tokenizer(byte_bpe, expected_size=len(keys))
    assert vocab.lookup.tolist() == expected
    assert vocab.num_compressed < vocab.vocab_size  # " apple", "APPLE", "apple" ... merged


def test_compressed_vocab_of_the_wrong_size_is_refused(byte_bpe):
    with pytest.raises(ValueError, match="engram_compressed_vocab_size"):
        CompressedVocab.from_tokenizer(byte_bpe, expected_size=99092)


# --- the served-from-disk recipe, tiny -------------------------------------------------------
def test_disk_recipe_decodes_through_engram_layers_at_tiny_size(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    args = ["--dir", str(tmp_path / "v41"), "--table-gb", "0.02", "--prefill", "4", "--steps", "4"]
    out = subprocess.run(
        [sys.executable, str(root / "recipes" / "deepseek_v41_disk.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "rows read from the files" in out and "peak RSS" in out
    assert not (tmp_path / "v41").exists()  # checkpoint and tables deleted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tier", ["device", "host"])
def test_cuda_forward_matches_reference_within_bf16(ckpt, tier):
    path, info = ckpt
    module = load_engram(path, tables=tier, device="cuda")[14]
    g = torch.Generator().manual_seed(9)
    ids, dead = random_ids(g, 2, 24, info["vc"])
    h = torch.randn(2, 24, info["hc"], info["D"], generator=g).to(torch.bfloat16)
    got = module(h.cuda(), ids.cuda(), dead.cuda())
    want = ref_forward(h, ref_rows(info, 14, ids, dead), info["layers"][14], ~dead)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want)


def test_a_failed_stream_leaves_no_half_written_tables(ckpt, tmp_path, monkeypatch):
    from engramlm import table_io

    path, _ = ckpt
    real_read = table_io.TensorLocation.read

    def failing_read(self, *args, **kwargs):
        if self.name == "layers.14.engram.embed.weight":
            raise OSError("EIO: simulated read error")
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(table_io.TensorLocation, "read", failing_read)
    with pytest.raises(OSError, match="simulated"):
        load_engram(path, tables="disk", table_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # layer 1's finished table is removed too


def test_positions_never_written_read_as_dead(ckpt):
    path, info = ckpt
    module = load_engram(path)[1]
    g = torch.Generator().manual_seed(10)
    ids, _ = random_ids(g, 2, 6, info["vc"])
    unknown = torch.full((2, 5), DEAD)  # positions 0..4 never written: DEAD, never the pad
    want = ref_rows(
        info,
        1,
        torch.cat([unknown.clamp_min(0), ids], 1),
        torch.cat([unknown == DEAD, torch.zeros_like(ids, dtype=torch.bool)], 1),
    )
    assert torch.equal(module.hash_ids(ids, start_pos=5), want[:, 5:])


def test_hf_prefixed_names_and_shards_without_an_index_load(tmp_path):
    info = write_checkpoint(tmp_path, name_prefix="model.")
    (tmp_path / "model.safetensors.index.json").unlink()
    modules = load_engram(tmp_path)
    g = torch.Generator().manual_seed(11)
    ids, dead = random_ids(g, 1, 12, info["vc"])
    assert torch.equal(modules[14].hash_ids(ids, dead), ref_rows(info, 14, ids, dead))


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    write_checkpoint(tmp_path)
    next(tmp_path.glob("*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="a shard named by model.safetensors.index.json"):
        load_engram(tmp_path)
