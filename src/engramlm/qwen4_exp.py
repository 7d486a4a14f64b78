"""Qwen4-Exp's PLE layers as engramlm :class:`~engramlm.engram.Engram` modules.

transformers' ``qwen4_exp`` (Qwen3.8-Flash-Next) has "PLE" (per-layer embedding) layers that
are an Engram variant. The facts, read from ``transformers/models/qwen4_exp`` and mapped onto
:class:`~engramlm.config.EngramConfig` by :func:`engram_config`:

- orders 2..``ngram_size``, ``heads_per_ngram`` heads each, raw token ids (no compression);
  multipliers by SplitMix64 seeded ``seed + 10007 * i`` with ``i`` the layer's index among the
  PLE layers (``multiplier_scheme="splitmix64"``, ``hash_layer_key="layer_index"``);
- head sizes: the n-th prime >= ``ngram_vocab_size_base`` by a global head index, which is our
  prime scheme with ``table_sizes = (base,) * (N-1)``; one table per layer, heads stacked,
  padded to a multiple of ``make_ngram_vocab_size_divisible_by`` rows;
- the n-gram history restarts after every EOS and is filled with EOS (``reset_token`` and
  ``pad_id`` = EOS);
- one key per hyper-connection stream (``hc_count``) and a shared value, no biases, group-wise
  RMSNorms scaling by ``(1 + weight)`` (we store ``1 + weight``), eps ``rms_norm_eps``;
- a zero-initialised depthwise short conv with dilation N, Y = U + SiLU(conv(norm(U)));
- ``ple_layer_ids`` are 1-based; ours are 0-based.

Decode state lives where transformers keeps it, in the model's own cache: conv state slot 1 of
the PLE layer's linear-attention cache layer holds the short conv's last (w-1)N normalised
inputs, slot 2 the last N-1 token ids. So beam reordering moves it with the rest of the cache,
and the cache refuses to crop, as it does for the unmodified model (its linear-attention layers
carry recurrent states).

:func:`install` puts :class:`Qwen4ExpPLE` modules into a loaded model;
``engramlm.hf.load_offloaded`` builds the model, its table tier and calls it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from engramlm.config import EngramConfig
from engramlm.engram import Engram, head_offsets, table_rows
from engramlm.hashing import NgramHasher
from engramlm.tables import Table

logger = logging.getLogger(__name__)

MODEL_TYPES = ("qwen4_exp", "qwen4_exp_text")
CONV_STATE = 1  # cache conv-state slot of the PLE short conv (transformers' state_idx=1)
NGRAM_STATE = 2  # cache conv-state slot of the last N-1 token ids (state_idx=2)
# Checkpoint keys of a PLE layer: "<prefix>layers.<i>.ple.<rest>".
PLE_KEY = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.ple\.(?P<rest>.+)$")
TABLE_PART = re.compile(r"^ple_embedding\.ngram_embedding\.(?:shard_(?P<part>\d+)\.)?weight$")
# The small weights of a PLE layer, by their name in the checkpoint.
DENSE_WEIGHTS = ("key_proj.weight", "value_proj.weight", "norm_key.weight", "norm_query.weight")
CONV_WEIGHTS = ("norm_conv.weight", "conv1d.weight")
# Saved buffers that pin down the hash; checked against ours at load.
HASH_BUFFERS = (
    "ple_embedding.layer_multipliers",
    "ple_embedding.ngram_heads_vocab_sizes",
    "ple_embedding.ngram_heads_offsets",
)


def eos_id(text_config: Any) -> int:
    """The EOS id Qwen4-Exp resets and fills the n-gram history with (the first of a list)."""
    eos = text_config.eos_token_id
    eos = eos[0] if isinstance(eos, list | tuple) else eos
    if eos is None:
        raise ValueError("the Qwen4-Exp config has no eos_token_id; PLE layers need one")
    return int(eos)


def engram_config(text_config: Any) -> EngramConfig:
    """The :class:`EngramConfig` of a ``Qwen4ExpTextConfig``'s PLE layers (see module doc)."""
    N, K = text_config.ngram_size, text_config.heads_per_ngram
    if not text_config.ple_layer_ids:
        raise ValueError("the Qwen4-Exp config has no PLE layers (ple_layer_ids is empty)")
    if text_config.ple_embed_dim % (N - 1):
        raise ValueError(
            f"ple_embed_dim={text_config.ple_embed_dim} must be divisible by ngram_size-1={N - 1}"
        )
    eos = eos_id(text_config)
    return EngramConfig(
        table_sizes=(text_config.ngram_vocab_size_base,) * (N - 1),
        max_ngram=N,
        heads_per_ngram=K,
        embed_dim_per_ngram=text_config.ple_embed_dim // (N - 1),
        layer_ids=tuple(i - 1 for i in text_config.ple_layer_ids),  # 1-based -> 0-based
        pad_id=eos,
        seed=text_config.seed,
        kernel_size=text_config.ple_conv_kernel_size,
        hc_mult=text_config.hc_count,
        gate="signed_sqrt",
        compress_tokens=False,
        bias=False,
        norm_eps=text_config.rms_norm_eps,
        conv_norm_eps=text_config.rms_norm_eps,
        multiplier_scheme="splitmix64",
        hash_layer_key="layer_index",
        reset_token=eos,
        table_rows_multiple=text_config.make_ngram_vocab_size_divisible_by,
    )


def ngram_hasher(text_config: Any) -> NgramHasher:
    """The hasher of every PLE layer: raw ids, EOS as filler and reset token."""
    config = engram_config(text_config)
    eos = eos_id(text_config)
    return NgramHasher.from_config(
        config, pad_id=eos, compressed_vocab_size=text_config.vocab_size, reset_id=eos
    )


def table_shapes(text_config: Any) -> dict[int, tuple[int, int]]:
    """{0-based layer: [rows, head_dim]} of each PLE layer's n-gram table, from the config."""
    config = engram_config(text_config)
    hasher = ngram_hasher(text_config)
    multiple = config.table_rows_multiple
    return {
        layer: (table_rows(hasher.moduli[layer], multiple), config.head_dim)
        for layer in config.layer_ids
    }


def engram_weights(ple: Mapping[str, Tensor], hc_count: int, hidden_size: int) -> dict[str, Tensor]:
    """A Qwen4-Exp PLE layer's small weights (checkpoint names) -> :class:`Engram`'s state dict.

    ``kv_proj`` is the M keys then the value; a Qwen RMSNorm scales by ``1 + weight`` over
    ``hc_count`` groups of ``hidden_size``, ours by ``weight`` per group: stored ``1 + w``.
    """
    missing = [k for k in (*DENSE_WEIGHTS, *CONV_WEIGHTS) if k not in ple]
    if missing:
        raise ValueError(f"PLE weights {missing} are missing")
    M, D = hc_count, hidden_size

    def norm(name: str) -> Tensor:
        return 1.0 + ple[name].float().view(M, D)

    return {
        "kv_proj.weight": torch.cat([ple["key_proj.weight"], ple["value_proj.weight"]]),
        "key_norm.weight": norm("norm_key.weight"),
        "query_norm.weight": norm("norm_query.weight"),
        "short_conv.norm.weight": norm("norm_conv.weight"),
        "short_conv.weight": ple["conv1d.weight"],
    }


class Qwen4ExpPLE(nn.Module):
    """Drop-in for a ``Qwen4ExpTextPLELayer``: engramlm's :class:`Engram` over any table tier.

    Same call as the layer it replaces, ``(hidden_states [B, T, M*D], input_ids [B, T], cache,
    conv_mask [B, T] | None) -> [B, T, M*D]``, same cache slots for its decode state.
    """

    def __init__(
        self, text_config: Any, layer_idx: int, hasher: NgramHasher, table: Table | None = None
    ) -> None:
        super().__init__()
        config = engram_config(text_config)
        if layer_idx not in config.layer_ids:
            raise ValueError(
                f"decoder layer {layer_idx} (0-based) has no PLE; ple_layer_ids (1-based) are "
                f"{list(text_config.ple_layer_ids)}"
            )
        self.layer_idx = layer_idx
        self.hc_count, self.hidden_size = text_config.hc_count, text_config.hidden_size
        self.eos = eos_id(text_config)
        self.context_len = config.max_ngram - 1
        self.hasher = hasher  # shared by every PLE layer of a model
        self.engram = Engram(config, text_config.hidden_size, hasher.moduli[layer_idx], table)
        assert self.engram.short_conv is not None  # Qwen4-Exp always has its short conv
        self.conv_len = self.engram.short_conv.receptive_field
        # The prefetch hook's (ids, history, hash ids) of the forward in progress, taken by
        # forward when its ids and history are the very same tensors: hashed once, not twice.
        # Not decode state (that is in the cache): consumed, and cleared, within one forward.
        self._hashed: tuple[Tensor, Tensor | None, Tensor] | None = None

    @torch.no_grad()
    def load_ple_weights(self, ple: Mapping[str, Tensor]) -> None:
        """Copy a Qwen4-Exp PLE layer's small weights (checkpoint names, see
        :func:`engram_weights`) into this module; ``ValueError`` on a shape the config does not
        imply."""
        for name, value in engram_weights(ple, self.hc_count, self.hidden_size).items():
            param = self.engram.get_parameter(name)
            if param.shape != value.shape:
                raise ValueError(
                    f"layer {self.layer_idx}'s PLE weight for {name} is {list(value.shape)}, "
                    f"the config implies {list(param.shape)}"
                )
            param.copy_(value)

    def hash_ids(self, input_ids: Tensor, history: Tensor | None) -> Tensor:
        """[B, T] raw ids (+ the last N-1 before them) -> [B, T, H] head-local rows."""
        hashed, self._hashed = self._hashed, None
        if hashed is not None and hashed[0] is input_ids and hashed[1] is history:
            return hashed[2]
        return self.hasher(input_ids, self.layer_idx, prefix=history)

    def prefetch(self, input_ids: Tensor, history: Tensor | None) -> None:
        """Start gathering the rows this layer will look up for [B, T] ``input_ids``; the hash
        ids are kept for the forward that follows with the same tensors."""
        hash_ids = self.hash_ids(input_ids, history)
        self.engram.prefetch(hash_ids)
        self._hashed = (input_ids, history, hash_ids)

    def forward(
        self,
        hidden_states: Tensor,
        input_ids: Tensor,
        cache: Any = None,
        conv_mask: Tensor | None = None,
    ) -> Tensor:
        B, T, _ = hidden_states.shape
        history = cache.get_conv_state(self.layer_idx, NGRAM_STATE) if cache is not None else None
        hash_ids = self.hash_ids(input_ids, history)  # [B, T, H]
        ids = input_ids.long()
        if cache is not None:
            if history is None and T < self.context_len:  # the cache would pad with 0, not EOS
                ids = nn.functional.pad(ids, (self.context_len - T, 0), value=self.eos)
            cache.update_conv_state(
                ids, self.layer_idx, state_idx=NGRAM_STATE, conv_kernel_size=self.context_len
            )
        state = cache.get_conv_state(self.layer_idx, CONV_STATE) if cache is not None else None
        hidden = hidden_states.unflatten(-1, (self.hc_count, self.hidden_size))  # [B, T, M, D]
        mask = conv_mask.bool() if conv_mask is not None else None
        y, state = self.engram(
            hidden, hash_ids, None if state is None else state[..., -self.conv_len :], mask
        )
        if cache is not None:  # the new columns: the cache appends them to what it holds
            cache.update_conv_state(
                state[..., -min(T, self.conv_len) :],
                self.layer_idx,
                state_idx=CONV_STATE,
                conv_kernel_size=self.conv_len,
            )
        return y.flatten(-2)  # [B, T, M*D]


def from_transformers_layer(
    layer: nn.Module, text_config: Any, table: Table | None = None
) -> Qwen4ExpPLE:
    """A :class:`Qwen4ExpPLE` with the weights of a ``Qwen4ExpTextPLELayer`` (tables copied
    into a new in-memory table unless ``table`` is given)."""
    ours = Qwen4ExpPLE(text_config, layer.layer_idx, ngram_hasher(text_config), table)
    ours.load_ple_weights({k: v.detach() for k, v in layer.state_dict().items()})
    if table is None:
        weight = layer.ple_embedding.ngram_embedding.weight.detach()
        ours.engram.table.weight.data.copy_(weight)
    return ours.to(layer.key_proj.weight.dtype)


def prefetch_hook(modules: list[Qwen4ExpPLE]) -> Any:
    """A forward pre-hook for the text model: as soon as its ids are known, every PLE layer's
    table starts gathering the rows the layer will look up (a hint: a miss is only slower)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("ple_input_ids")
        if ids is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, Tensor) or not modules:
            return
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim == 2 and ids.shape[1] > 1:
            mask = mask[:, -ids.shape[1] :].bool()
            if not bool(mask.all()):  # what the model's forward does to padded positions
                ids = torch.where(mask, ids, modules[0].eos)  # (hashed again by the layers)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        with torch.no_grad():
            for ple in modules:
                history = None
                if cache is not None and hasattr(cache, "get_conv_state"):
                    history = cache.get_conv_state(ple.layer_idx, NGRAM_STATE)
                ple.prefetch(ids, history)

    return hook


def install(model: nn.Module, modules: dict[int, Qwen4ExpPLE]) -> None:
    """Put ``modules`` ({0-based layer: PLE}) into a Qwen4-Exp model's decoder layers, and the
    prefetch hook onto its text model."""
    text_model = text_model_of(model)
    for layer_idx, ple in modules.items():
        decoder = text_model.layers[layer_idx]
        device = next(decoder.parameters()).device
        decoder.ple = ple.to(device)
    text_model.register_forward_pre_hook(prefetch_hook(list(modules.values())), with_kwargs=True)


def text_model_of(model: nn.Module) -> nn.Module:
    """The ``Qwen4ExpTextModel`` inside a causal-LM or conditional-generation model."""
    inner = model.model if hasattr(model, "model") else model
    inner = getattr(inner, "language_model", inner)
    if not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__name__} has no Qwen4-Exp text model with .layers")
    return inner


def table_sources(
    model_dir: Any, text_config: Any, tensors: dict[str, tuple[Any, list[int], str]]
) -> list[Any]:
    """Each PLE layer's table in the checkpoint, as a :class:`~engramlm.table_io.TableSource`
    named ``ple_layer<i>`` (0-based): its ``shard_<j>`` parts in order, or one tensor."""
    from engramlm.table_io import TableSource

    parts: dict[int, list[tuple[int, Any, str]]] = {}
    for key, (path, _, _) in tensors.items():
        m = PLE_KEY.match(key)
        part = TABLE_PART.match(m["rest"]) if m else None
        if m and part:
            index = int(part["part"]) if part["part"] is not None else 0
            parts.setdefault(int(m["layer"]), []).append((index, path, key))
    shapes = table_shapes(text_config)
    if sorted(parts) != sorted(shapes):
        raise ValueError(
            f"{model_dir}: the checkpoint has n-gram tables for layers {sorted(parts)} "
            f"(0-based), config.json's ple_layer_ids need {sorted(shapes)}"
        )
    sources = []
    for layer, (rows, dim) in shapes.items():
        found = sorted(parts[layer])
        indices = [i for i, _, _ in found]
        if indices != list(range(len(found))):
            raise ValueError(
                f"{model_dir}: layer {layer}'s n-gram table parts are {indices}, not 0..n-1: "
                "a part (checkpoint shard) is missing"
            )
        sources.append(
            TableSource(f"ple_layer{layer}", tuple((p, k) for _, p, k in found), rows, dim)
        )
    return sources


def _layer_tensors(
    tensors: dict[str, tuple[Any, list[int], str]], layer: int, names: tuple[str, ...]
) -> dict[str, Tensor]:
    """{name: tensor} of PLE layer ``layer``'s small tensors (names after ``ple.``), read from
    their shards; ``ValueError`` naming any that is missing."""
    from safetensors import safe_open

    keys = {}
    for key in tensors:
        m = PLE_KEY.match(key)
        if m and int(m["layer"]) == layer and m["rest"] in names:
            keys[m["rest"]] = key
    missing = sorted(set(names) - set(keys))
    if missing:
        raise ValueError(f"the checkpoint lacks layer {layer}'s PLE tensors {missing}")
    out = {}
    for name, key in keys.items():
        with safe_open(str(tensors[key][0]), framework="pt") as f:
            out[name] = f.get_tensor(key)
    return out


def load(
    model_dir: Any,
    *,
    engram_tables: str,
    table_dir: Any = None,
    cache_rows: int | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """A Qwen4-Exp folder's transformers model, its PLE layers replaced by :class:`Qwen4ExpPLE`
    over a table tier (``engramlm.hf.load_offloaded`` documents the arguments).

    transformers builds and loads the model with ``ple_layer_ids`` emptied, so it never
    allocates nor reads the n-gram tables (their keys are left unmatched, unread); the PLE
    layers and the config's ``ple_layer_ids`` are put back afterwards.
    """
    import copy

    import transformers
    from transformers import AutoConfig

    from engramlm.table_io import checkpoint_tensors, load_table_tier

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    if not text.ple_layer_ids:
        raise ValueError(
            f"{model_dir} is a Qwen4-Exp model without PLE layers (ple_layer_ids is empty): it "
            "has no n-gram tables to offload; load it with AutoModelForCausalLM.from_pretrained"
        )
    engram = engram_config(text)
    tensors = checkpoint_tensors(model_dir)  # every shard present and complete
    sources = table_sources(model_dir, text, tensors)
    hasher = ngram_hasher(text)
    for layer in engram.layer_ids:
        saved = _layer_tensors(tensors, layer, HASH_BUFFERS) if _has(tensors, layer) else {}
        _check_hash(layer, saved, hasher)
    tables = load_table_tier(
        model_dir,
        sources,
        kind=engram_tables,
        table_dir=table_dir,
        cache_rows=cache_rows,
        identity={"model_type": text.model_type, "engram": engram.to_dict()},
    )
    without_ple = copy.deepcopy(config)
    without_ple.get_text_config().ple_layer_ids = []
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unread PLE keys would be listed one by one
    try:
        model, info = model_class(config).from_pretrained(
            model_dir, config=without_ple, output_loading_info=True, **from_pretrained_kwargs
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"] or info.get("mismatched_keys"):
        raise ValueError(
            f"{model_dir}: weights missing from the checkpoint {sorted(info['missing_keys'])[:8]}"
            f", mismatched {sorted(info.get('mismatched_keys') or [])[:8]}"
        )
    unread = [k for k in info["unexpected_keys"] if ".ple." not in k]
    if unread:
        logger.warning("%s: checkpoint tensors the model does not use: %s", model_dir, unread[:8])
    model.config.get_text_config().ple_layer_ids = list(text.ple_layer_ids)
    dtype = model.get_input_embeddings().weight.dtype
    modules = {}
    for layer in engram.layer_ids:
        ple = Qwen4ExpPLE(text, layer, hasher, tables[f"ple_layer{layer}"])
        ple.load_ple_weights(_layer_tensors(tensors, layer, DENSE_WEIGHTS + CONV_WEIGHTS))
        modules[layer] = ple.to(dtype).eval()
    install(model, modules)
    model.eval()
    return model


def model_class(config: Any) -> Any:
    """The folder's own class (``config.architectures[0]``, e.g. ``Qwen4ExpForCausalLM`` or
    ``Qwen4ExpForConditionalGeneration``), else transformers' ``AutoModelForCausalLM``."""
    import transformers

    names = getattr(config, "architectures", None) or []
    own = getattr(transformers, names[0], None) if names else None
    return own if own is not None else transformers.AutoModelForCausalLM


def _has(tensors: dict[str, Any], layer: int) -> bool:
    """Whether the checkpoint saved layer ``layer``'s hash buffers (transformers does)."""
    return any(
        (m := PLE_KEY.match(k)) and int(m["layer"]) == layer and m["rest"] in HASH_BUFFERS
        for k in tensors
    )


def _check_hash(layer: int, saved: dict[str, Tensor], hasher: NgramHasher) -> None:
    """Refuse a checkpoint whose saved hash constants differ from those its config implies."""
    ours = {
        "ple_embedding.layer_multipliers": getattr(hasher, f"mult_{layer}").tolist(),
        "ple_embedding.ngram_heads_vocab_sizes": list(hasher.moduli[layer]),
        "ple_embedding.ngram_heads_offsets": head_offsets(hasher.moduli[layer]).tolist(),
    }
    for name, value in saved.items():
        if value.tolist() != ours[name]:
            raise ValueError(
                f"layer {layer}'s saved {name} {value.tolist()[:4]}... differ from the ones "
                f"config.json implies {ours[name][:4]}...: the rows would be read at the wrong "
                "addresses (seed, vocab_size, ngram_vocab_size_base or ple_layer_ids changed?)"
            )
