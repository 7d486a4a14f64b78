"""DeepSeek-V4.1-Flash's Engram: its config, checkpoint tensors and module (DEEPSEEK_V41_ENGRAM.md).

The variant is configuration of the same :class:`~engramlm.engram.Engram` and
:class:`~engramlm.hashing.NgramHasher` (``EngramConfig.preset("deepseek-v4.1-flash")``): one
prime-search start for all orders (§3.1), the demo's multipliers seeded ``10007 * layer id``
(§3.3), DEAD tokens with cumulative blocking (§3.4), a fused bias-free ``wkv`` with keys first
(§5), the gate in fp32 with eps 1e-20, no short conv. What is V4.1's own lives here:

- :class:`DeepSeekV41Config`, read from ``config.json`` in either spelling (§1, §7 D1), checked
  (prime sums = ``engram_num_embeddings``; the released multipliers);
- :class:`DeepSeekV41Engram`, one layer: ``streams [B, T, hc, D] -> streams``, adding
  ``gate * value`` to every stream in fp32 (§5 step 5), with a position-indexed history of
  compressed ids so chunked prefill and decode hash as one prefill (§3.6);
- :func:`load_engram`, which reads the layer tensors (§6) from any number of safetensors shards
  and streams the fp8 tables (§4) into the chosen tier, never upcast whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from engramlm.config import EngramConfig
from engramlm.engram import Engram, table_rows
from engramlm.hashing import DEAD, NgramHasher, head_moduli, layer_multipliers
from engramlm.tables import DeviceTable, MemoryStore, OffloadedTable, Table, disk_table, fp8
from engramlm.tokenization import CompressedVocab

if TYPE_CHECKING:
    from engramlm.table_io import TensorLocation

logger = logging.getLogger(__name__)

TableTier = Literal["device", "host", "disk"]
SOURCE_RECORD = "source.json"  # beside a complete disk table: the checkpoint bytes it holds

# Released multipliers (spec §3.3), the ground truth: numpy does not promise its Generator
# streams across versions, so the ones we draw for the released config are checked against these.
RELEASED_COMPRESSED_VOCAB_SIZE = 99092
RELEASED_MULTIPLIERS: dict[int, tuple[int, ...]] = {
    1: (76632096046245, 4839876093313, 35959672319349, 73987337458391),
    14: (67716810739261, 51510806800915, 30921347202721, 82619226485591),
}

# config.json field -> DeepSeekV41Config field, for both spellings (spec §1, §7 D1): the HF one
# (under ``text_config``) and REF's ModelArgs.
_FIELDS: dict[str, tuple[str, ...]] = {
    "layer_ids": ("engram_layer_ids",),
    "num_embeddings": ("engram_num_embeddings",),
    "max_ngram": ("engram_max_ngram_size",),
    "vocab_size": ("engram_vocab_size",),
    "n_heads": ("engram_n_heads",),
    "head_dim": ("engram_head_dim",),
    "pad_id": ("engram_pad_token_id", "engram_pad_id"),
    "compressed_vocab_size": ("engram_compressed_vocab_size",),
    "hc_mult": ("hc_mult",),
    "hidden_size": ("hidden_size", "dim"),
    "norm_eps": ("rms_norm_eps", "norm_eps"),
}


@dataclass(frozen=True)
class DeepSeekV41Config:
    """The Engram fields of a DeepSeek-V4.1 ``config.json`` (spec §1), validated.

    ``vocab_size`` is ``engram_vocab_size``, the prime-search start shared by all orders
    (16,000,000 released), not the tokenizer's size; ``num_embeddings`` are each layer's table
    rows, which must equal the sum of its head primes (§3.1: the checkpoint has no padding).
    """

    layer_ids: tuple[int, ...] = (1, 14)
    num_embeddings: tuple[int, ...] = (384_006_168, 384_016_682)
    max_ngram: int = 4
    vocab_size: int = 16_000_000
    n_heads: int = 8
    head_dim: int = 256
    pad_id: int = 2
    compressed_vocab_size: int = RELEASED_COMPRESSED_VOCAB_SIZE
    hc_mult: int = 4
    hidden_size: int = 5120
    norm_eps: float = 1e-20

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_ids", tuple(self.layer_ids))
        object.__setattr__(self, "num_embeddings", tuple(self.num_embeddings))
        if len(self.num_embeddings) != len(self.layer_ids):
            raise ValueError(
                f"engram_num_embeddings has {len(self.num_embeddings)} entries for "
                f"{len(self.layer_ids)} engram_layer_ids {list(self.layer_ids)}: one per layer"
            )
        if self.head_dim % fp8.BLOCK:
            raise ValueError(
                f"engram_head_dim={self.head_dim} must be a multiple of {fp8.BLOCK} (one E8M0 "
                f"scale per {fp8.BLOCK} values)"
            )
        engram = self.engram  # validates the shared fields (EngramConfig's checks)
        moduli = self.moduli
        for layer, rows in zip(self.layer_ids, self.num_embeddings, strict=True):
            primes = moduli[layer]
            if table_rows(primes) != rows:
                raise ValueError(
                    f"engram_num_embeddings for layer {layer} is {rows}, but its "
                    f"{engram.num_heads} head primes (searched from engram_vocab_size="
                    f"{self.vocab_size}) sum to {sum(primes)}: the config does not describe "
                    "these tables (wrong engram_vocab_size, engram_n_heads, layer ids or size)"
                )
        if self.compressed_vocab_size == RELEASED_COMPRESSED_VOCAB_SIZE and engram.seed == 0:
            for layer in set(self.layer_ids) & set(RELEASED_MULTIPLIERS):
                drawn = self.multipliers(layer)
                if drawn != RELEASED_MULTIPLIERS[layer]:
                    raise RuntimeError(
                        f"numpy {np.__version__} draws multipliers {drawn} for "
                        f"layer {layer}, the released model uses {RELEASED_MULTIPLIERS[layer]} "
                        "(spec §3.3): this numpy's Generator stream differs; pin numpy 2.x"
                    )

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DeepSeekV41Config:
        """From a ``config.json`` dict: HF format (fields under ``text_config``, else at the top)
        or REF's ModelArgs (``dim``, ``norm_eps``, ``engram_pad_id``). Names missing fields."""
        d = raw.get("text_config", raw)
        values: dict[str, Any] = {}
        missing = []
        for field, keys in _FIELDS.items():
            found = [k for k in keys if k in d]
            if not found:
                missing.append(" or ".join(keys))
                continue
            values[field] = d[found[0]]
        if missing:
            raise ValueError(
                f"config.json lacks the DeepSeek-V4.1 Engram fields {missing} (looked in "
                f"{'text_config' if 'text_config' in raw else 'the top level'})"
            )
        return cls(**values)

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike[str]) -> DeepSeekV41Config:
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the checkpoint folder")
        return cls.from_json(json.loads(path.read_text()))

    @property
    def engram(self) -> EngramConfig:
        """The :class:`EngramConfig` of this variant (``preset("deepseek-v4.1-flash")`` for the
        released numbers): every order searches primes from ``engram_vocab_size``."""
        return EngramConfig.preset(
            "deepseek-v4.1-flash",
            table_sizes=(self.vocab_size,) * (self.max_ngram - 1),
            max_ngram=self.max_ngram,
            heads_per_ngram=self.n_heads,
            embed_dim_per_ngram=self.n_heads * self.head_dim,
            layer_ids=self.layer_ids,
            pad_id=self.pad_id,
            hc_mult=self.hc_mult,
            norm_eps=self.norm_eps,
        )

    @property
    def moduli(self) -> dict[int, tuple[int, ...]]:
        """{layer id: its (N-1)K head primes, order-major} (spec §3.1)."""
        e = self.engram
        return head_moduli(
            layer_ids=e.layer_ids,
            table_sizes=e.table_sizes,
            heads_per_ngram=e.heads_per_ngram,
            max_ngram=e.max_ngram,
        )

    def multipliers(self, layer_id: int) -> tuple[int, ...]:
        """The N odd multipliers of ``layer_id`` (spec §3.3)."""
        return layer_multipliers(
            seed=self.engram.seed,
            layer_id=layer_id,
            max_ngram=self.max_ngram,
            compressed_vocab_size=self.compressed_vocab_size,
        )

    def check_vocab(self, num_compressed: int) -> None:
        """Refuse a compressed vocabulary of another size: the multipliers depend on it, so every
        row would move (spec §2 step 3)."""
        if num_compressed != self.compressed_vocab_size:
            raise ValueError(
                f"the tokenizer compresses to {num_compressed} ids, the checkpoint was hashed "
                f"with engram_compressed_vocab_size={self.compressed_vocab_size}: every table "
                "row would move; use the checkpoint's own tokenizer"
            )


@dataclass
class V41History:
    """Decode state of one V4.1 Engram layer: the compressed ids its sequences have seen, by
    absolute position (spec §3.6). A generation cache owns one per Engram layer and passes it
    as ``state=`` (and reorders or crops it with its beams and rewinds); without one, the module
    uses its own :attr:`DeepSeekV41Engram.state`, which suits one sequence batch at a time."""

    ids: Tensor | None = None  # [B, L] compressed ids by position, DEAD where unknown
    length: int = 0  # positions [0, length) are the current sequence

    def reset(self) -> None:
        """Forget everything: the next call starts new sequences at position 0."""
        self.ids, self.length = None, 0

    def reorder(self, beam_idx: Tensor) -> None:
        """Keep row ``beam_idx[i]`` as row i (beam search's reordering, batch expansion)."""
        if self.ids is not None:
            self.ids = self.ids[beam_idx.to(self.ids.device)]

    def crop(self, length: int) -> None:
        """Forget positions ``length`` and later (a rewind, e.g. rejected draft tokens)."""
        if length < 0:
            raise ValueError(f"crop length must be >= 0, got {length}")
        if self.ids is not None:
            self.ids[:, length:] = DEAD
        self.length = min(self.length, length)


class DeepSeekV41Engram(nn.Module):
    """One V4.1 Engram layer: ``forward(streams [B, T, hc, D], compressed_ids [B, T]) -> streams``.

    ``out_s = h_s + gate_s * value`` in fp32, cast once to the streams' dtype (spec §5 step 5);
    the gate and value come from :class:`Engram` (``hasher`` and ``engram`` are shared code).
    DEAD positions (``compressed_ids == -1`` or ``dead`` True) are never hashed, block older
    look-backs and leave their streams unchanged (gate 0; spec §3.4, §7 D2).

    History (spec §3.6, REF/HF): the compressed ids seen so far, by absolute position. Each
    call hashes positions [start_pos, start_pos + T); ``start_pos`` defaults to the end of the
    history, so calls in sequence (a prefill in chunks, then decode steps) give exactly the ids
    and outputs of one prefill. ``start_pos=0`` (or :meth:`reset`) starts new sequences;
    positions before ``start_pos`` never written read as DEAD. :meth:`hash_ids` reads the
    history; :meth:`forward` also writes it. The history is a :class:`V41History`: the module's
    own (:attr:`state`) unless a caller's generation cache passes its own as ``state=``.
    """

    def __init__(
        self,
        config: DeepSeekV41Config,
        layer_id: int,
        table: Table,
        *,
        hasher: NgramHasher | None = None,
        compressed_pad_id: int | None = None,
    ) -> None:
        super().__init__()
        if layer_id not in config.layer_ids:
            raise ValueError(f"layer {layer_id} has no Engram; layer ids: {config.layer_ids}")
        self.config = config
        self.layer_id = layer_id
        # Raw 2 -> compressed 2 for the released tokenizer (spec §2), the default.
        pad = config.pad_id if compressed_pad_id is None else compressed_pad_id
        self.hasher = hasher or NgramHasher.from_config(
            config.engram, pad_id=pad, compressed_vocab_size=config.compressed_vocab_size, dead=True
        )
        self.engram = Engram(config.engram, config.hidden_size, self.hasher.moduli[layer_id], table)
        self.state = V41History()  # used when a call passes no state of its own

    @property
    def length(self) -> int:
        """Positions the module's own history holds (the next call's default start)."""
        return self.state.length

    def reset(self) -> None:
        """Forget the module's own history: the next call starts new sequences at position 0."""
        self.state.reset()

    def _ids(self, compressed_ids: Tensor, dead: Tensor | None) -> Tensor:
        if compressed_ids.dim() != 2 or compressed_ids.dtype != torch.int64:
            raise ValueError(
                f"compressed_ids must be [B, T] int64, got {compressed_ids.dtype} "
                f"{list(compressed_ids.shape)}"
            )
        V = self.config.compressed_vocab_size
        bad = ((compressed_ids < 0) & (compressed_ids != DEAD)) | (compressed_ids >= V)
        if bool(bad.any()):
            raise ValueError(
                f"compressed id {int(compressed_ids[bad][0])} is outside [0, {V}) and not DEAD "
                f"({DEAD}): compress raw ids with the checkpoint's tokenizer first"
            )
        if dead is None:
            return compressed_ids
        if dead.shape != compressed_ids.shape or dead.dtype != torch.bool:
            raise ValueError(
                f"dead must be a bool tensor shaped like compressed_ids "
                f"{list(compressed_ids.shape)}, got {dead.dtype} {list(dead.shape)}"
            )
        return compressed_ids.masked_fill(dead, DEAD)

    def _prefix(self, B: int, start_pos: int, state: V41History) -> Tensor:
        """[B, N-1] ids at positions start_pos-N+1 .. start_pos-1: pad before 0, DEAD unknown."""
        N1 = self.config.max_ngram - 1
        hist = state.ids if start_pos > 0 else None
        if hist is not None and hist.shape[0] != B:
            raise ValueError(
                f"batch of {B} rows, the history holds {hist.shape[0]}: call reset() (or pass "
                "start_pos=0) to start new sequences"
            )
        positions = torch.arange(start_pos - N1, start_pos)
        device = self.engram.offsets.device
        prefix = torch.full((B, N1), DEAD, dtype=torch.int64, device=device)
        prefix[:, positions < 0] = self.hasher.pad_id
        known = (positions >= 0) & (positions < (0 if hist is None else hist.shape[1]))
        if hist is not None and bool(known.any()):
            prefix[:, known] = hist[:, positions[known]].to(device)
        return prefix

    def _local_ids(self, ids: Tensor, start_pos: int, state: V41History) -> Tensor:
        prefix = self._prefix(ids.shape[0], start_pos, state)  # [B, T] -> [B, T, H]
        return self.hasher(ids, self.layer_id, prefix.to(ids.device))

    def hash_ids(
        self,
        compressed_ids: Tensor,
        dead: Tensor | None = None,
        start_pos: int | None = None,
        *,
        state: V41History | None = None,
    ) -> Tensor:
        """[B, T] -> [B, T, (N-1)K] rows of this layer's table (offsets added; spec §3.5)."""
        state = self.state if state is None else state
        ids = self._ids(compressed_ids, dead)
        start = state.length if start_pos is None else start_pos
        return self.engram.global_rows(self._local_ids(ids, start, state))

    def prefetch(
        self,
        compressed_ids: Tensor,
        dead: Tensor | None = None,
        start_pos: int | None = None,
        *,
        state: V41History | None = None,
    ) -> None:
        """Hint the table that the rows of these positions will be looked up (spec §4)."""
        self.engram.table.prefetch(self.hash_ids(compressed_ids, dead, start_pos, state=state))

    def forward(
        self,
        streams: Tensor,
        compressed_ids: Tensor,
        dead: Tensor | None = None,
        start_pos: int | None = None,
        *,
        state: V41History | None = None,
    ) -> Tensor:
        """([B, T, hc, D], [B, T] compressed ids, [B, T] bool) -> [B, T, hc, D] streams."""
        state = self.state if state is None else state
        ids = self._ids(compressed_ids, dead)
        if streams.dim() != 4 or streams.shape[:2] != ids.shape:
            raise ValueError(
                f"streams must be [B, T, hc, D] with [B, T] = {list(ids.shape)} (the ids' shape), "
                f"got {list(streams.shape)}"
            )
        start = state.length if start_pos is None else start_pos
        local = self._local_ids(ids, start, state)  # [B, T, H]
        u = self.engram.gated_value(streams, local, mask=ids != DEAD)  # [B, T, hc, D] fp32
        self._record(ids, start, state)
        return (streams.float() + u.float()).to(streams.dtype)

    @staticmethod
    def _record(ids: Tensor, start: int, state: V41History) -> None:
        B, T = ids.shape
        stop = start + T
        hist = state.ids if start > 0 else None
        if hist is None or hist.shape[1] < stop:  # grow geometrically, unknown positions DEAD
            grown = torch.full((B, max(stop, 2 * (0 if hist is None else hist.shape[1]))), DEAD)
            if hist is not None:
                grown[:, : hist.shape[1]] = hist
            hist = grown
        hist[:, start:stop] = ids.cpu()
        hist[:, stop:] = DEAD  # later positions belong to a discarded continuation
        state.ids, state.length = hist, stop


def load_engram(
    checkpoint_dir: str | os.PathLike[str],
    *,
    tables: TableTier = "device",
    table_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    cache_mb: int = 1024,
    vocab: CompressedVocab | None = None,
) -> dict[int, DeepSeekV41Engram]:
    """The Engram layers of a DeepSeek-V4.1 checkpoint, keyed by 0-based layer id.

    Reads ``config.json`` (either spelling) and the layer tensors (spec §6) from the folder's
    safetensors shards (with or without ``model.safetensors.index.json``; names with or without
    HF's ``model.`` prefix). ``tables`` places each fp8 table: ``device`` (a buffer on
    ``device``), ``host`` (host memory, pinned with CUDA) or ``disk`` (a file under
    ``table_dir/engram_layer<L>`` behind a ``cache_mb`` row cache); every tier keeps the rows
    fp8 with their scales and dequantises on lookup. ``wkv`` is dequantised at load to
    ``dtype`` (exact: fp8 times a power of two) and ``q_weight * k_weight`` folded into one fp32
    norm weight (the only way the gate uses them; the product of two bf16 is exact in fp32).
    ``vocab`` (the checkpoint tokenizer's :class:`CompressedVocab`, optional) is checked against
    ``engram_compressed_vocab_size`` and gives the compressed pad; without it the pad is the raw
    ``engram_pad_id``, which the released tokenizer maps to itself (spec §2).

    Everything is checked before anything is written: missing tensors (all named), dtypes,
    shapes, the scale layouts, truncated shards. Rows are streamed chunk by chunk, so a 98 GB
    table never passes through memory. A disk table, once complete and synced, gets a
    ``source.json`` naming the checkpoint bytes it was copied from
    (``table_io.fp8_table_source``); a later load with the same ``table_dir`` serves such a table
    as it is instead of copying it again, and refuses a folder without that record (an
    interrupted copy) or with another (other bytes), naming the folder to delete.
    """
    from engramlm.table_io import fp8_table_source, safetensors_index, stream_fp8_table_rows

    if tables not in ("device", "host", "disk"):
        raise ValueError(f"tables must be 'device', 'host' or 'disk', got {tables!r}")
    if tables == "disk" and table_dir is None:
        raise ValueError("tables='disk' needs table_dir= (where the table files go)")
    config = DeepSeekV41Config.load(checkpoint_dir)
    pad = config.pad_id
    if vocab is not None:
        config.check_vocab(vocab.num_compressed)
        pad = int(vocab.lookup[config.pad_id])
    index = safetensors_index(checkpoint_dir)
    D, M, K, E = config.hidden_size, config.hc_mult, config.n_heads, config.head_dim
    n_cols = (config.max_ngram - 1) * K
    wkv_shape = ((M + 1) * D, n_cols * E)
    layers: dict[int, dict[str, TensorLocation]] = {}
    problems: list[str] = []
    for layer, rows in zip(config.layer_ids, config.num_embeddings, strict=True):
        expected = {
            "embed.weight": ("F8_E4M3", (rows, E)),
            "embed.scale": ("F8_E8M0", (rows, E // fp8.BLOCK)),
            "wkv.weight": ("F8_E4M3", wkv_shape),
            "wkv.scale": ("F8_E8M0", tuple(-(-s // fp8.BLOCK) for s in wkv_shape)),
            "q_weight": ("BF16", (M, D)),
            "k_weight": ("BF16", (M, D)),
        }
        found: dict[str, TensorLocation] = {}
        for part, (want_dtype, want_shape) in expected.items():
            name = f"layers.{layer}.engram.{part}"
            loc = index.get(name) or index.get(f"model.{name}")
            if loc is None:
                problems.append(f"missing tensor {name}")
                continue
            if (loc.dtype, loc.shape) != (want_dtype, want_shape):
                problems.append(
                    f"{loc.name} ({loc.path.name}) is {loc.dtype} {list(loc.shape)}, expected "
                    f"{want_dtype} {list(want_shape)}"
                )
            found[part] = loc
        layers[layer] = found
    if problems:
        raise ValueError(
            f"{checkpoint_dir} is not a DeepSeek-V4.1 Engram checkpoint matching its config.json "
            "(scales: one E8M0 per 32 values of a table row, 32x32 blocks of wkv):\n  "
            + "\n  ".join(problems)
        )
    sources = {  # only disk tables outlive the process
        layer: fp8_table_source(locs["embed.weight"], locs["embed.scale"])
        for layer, locs in layers.items()
        if tables == "disk"
    }
    reuse: set[int] = set()
    if tables == "disk":
        assert table_dir is not None
        stale = []
        for layer in config.layer_ids:
            folder = Path(table_dir) / f"engram_layer{layer}"
            if not folder.exists():
                continue
            record = folder / SOURCE_RECORD
            if record.is_file() and json.loads(record.read_text()) == sources[layer]:
                reuse.add(layer)
            else:
                stale.append(str(folder))
        if stale:
            raise FileExistsError(
                f"{stale} exist but are not complete tables of this checkpoint (no "
                f"{SOURCE_RECORD}: an interrupted copy; or one recording other bytes): delete "
                "them, or pass another table_dir"
            )
    hasher = NgramHasher.from_config(
        config.engram,
        pad_id=pad,
        compressed_vocab_size=config.compressed_vocab_size,
        dead=True,
    ).to(device)
    modules: dict[int, DeepSeekV41Engram] = {}
    opened: list[Table] = []
    try:
        for layer, rows in zip(config.layer_ids, config.num_embeddings, strict=True):
            locs = layers[layer]
            table = _fp8_table(
                tables, rows, E, layer, table_dir, device, cache_mb, create=layer not in reuse
            )
            opened.append(table)
            if layer not in reuse:
                stream_fp8_table_rows(table, locs["embed.weight"], locs["embed.scale"])
                if tables == "disk":
                    assert isinstance(table, OffloadedTable) and table_dir is not None
                    table.weight_store.sync()  # durable before it is recorded as complete
                    _write_record(Path(table_dir) / f"engram_layer{layer}", sources[layer])
            modules[layer] = _load_layer(config, layer, table, locs, hasher, device, dtype)
            how = "served as it was" if layer in reuse else "copied"
            logger.info(
                "DeepSeek-V4.1 Engram layer %d: %d rows, %s tier, %s", layer, rows, tables, how
            )
    except BaseException:  # e.g. an unreadable shard mid-stream: no half-written tables left
        for table in opened:
            if isinstance(table, OffloadedTable):
                table.close()
        if tables == "disk":
            assert table_dir is not None
            for layer in set(config.layer_ids) - reuse:
                shutil.rmtree(Path(table_dir) / f"engram_layer{layer}", ignore_errors=True)
        raise
    return modules


def _write_record(folder: Path, source: dict[str, Any]) -> None:
    """``folder/source.json``, atomically: the table there is complete (see load_engram)."""
    tmp = folder / (SOURCE_RECORD + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(source, indent=1))
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(folder / SOURCE_RECORD)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_layer(
    config: DeepSeekV41Config,
    layer: int,
    table: Table,
    locs: dict[str, TensorLocation],
    hasher: NgramHasher,
    device: torch.device | str,
    dtype: torch.dtype,
) -> DeepSeekV41Engram:
    """One layer's module around its (filled) table: ``wkv`` dequantised, q * k folded."""
    module = DeepSeekV41Engram(config, layer, table, hasher=hasher)
    engram = module.engram
    assert engram.query_norm is not None and engram.key_norm is not None
    with torch.no_grad():
        wkv = fp8.dequantize_blocks(locs["wkv.weight"].read(), locs["wkv.scale"].read())
        engram.kv_proj.weight = nn.Parameter(wkv.to(device, dtype), requires_grad=False)
        qk = locs["q_weight"].read().float() * locs["k_weight"].read().float()  # [M, D]
        engram.query_norm.weight.copy_(qk)
        engram.key_norm.weight.fill_(1.0)
    engram.query_norm.to(device)
    engram.key_norm.to(device)
    engram.offsets = engram.offsets.to(device)
    module.requires_grad_(False)
    return module.eval()


def _fp8_table(
    tier: TableTier,
    rows: int,
    dim: int,
    layer: int,
    table_dir: str | os.PathLike[str] | None,
    device: torch.device | str,
    cache_mb: int,
    *,
    create: bool = True,
) -> Table:
    if tier == "device":
        with torch.device(device):  # allocated there: no host copy of a ~100 GB table first
            return DeviceTable(rows, dim, dtype=fp8.FP8)
    if tier == "host":
        return OffloadedTable(MemoryStore(rows, dim, dtype=fp8.FP8), device=device)
    assert table_dir is not None
    path = Path(table_dir) / f"engram_layer{layer}"
    return disk_table(
        path, rows, dim, cache_bytes=cache_mb << 20, device=device, dtype=fp8.FP8, create=create
    )


def table_bytes(config: DeepSeekV41Config) -> dict[int, int]:
    """{layer id: bytes of its fp8 table with scales}, as the tiers store it (spec §1)."""
    width = fp8.packed_width(config.head_dim)
    return {
        layer: rows * width
        for layer, rows in zip(config.layer_ids, config.num_embeddings, strict=True)
    }


__all__ = [
    "RELEASED_MULTIPLIERS",
    "DeepSeekV41Config",
    "DeepSeekV41Engram",
    "load_engram",
    "table_bytes",
]
