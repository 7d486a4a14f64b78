"""EngramConfig: validated, frozen, presets, round trip."""

from __future__ import annotations

import dataclasses

import pytest

from engramlm import EngramConfig


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_ngram", 1),
        ("table_sizes", (1000,)),
        ("table_sizes", (1000, 1)),
        ("heads_per_ngram", 0),
        ("embed_dim_per_ngram", 100),
        ("layer_ids", ()),
        ("layer_ids", (1, 1)),
        ("layer_ids", (-1,)),
        ("pad_id", -2),
        ("kernel_size", 0),
        ("hc_mult", 0),
        ("gate", "relu"),
    ],
)
def test_invalid_field_is_named(field: str, value: object) -> None:
    name = "embed_dim_per_ngram|heads_per_ngram" if field == "embed_dim_per_ngram" else field
    with pytest.raises(ValueError, match=name):
        dataclasses.replace(EngramConfig(), **{field: value})


def test_non_integer_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="heads_per_ngram"):
        EngramConfig(heads_per_ngram=2.0)  # type: ignore[arg-type]


def test_defaults_are_the_demos() -> None:
    cfg = EngramConfig()
    assert cfg.table_sizes == (646_400, 646_400) and cfg.layer_ids == (1, 15)
    assert (cfg.max_ngram, cfg.heads_per_ngram, cfg.embed_dim_per_ngram) == (3, 8, 512)
    assert (cfg.seed, cfg.kernel_size, cfg.hc_mult) == (0, 4, 4)
    # The demo's pad id 2 is DeepSeek-V3's pad token; ours is resolved from the tokenizer.
    assert cfg.pad_id is None
    assert (cfg.bias, cfg.norm_eps, cfg.conv_norm_eps) == (True, None, 1e-5)
    assert cfg.memory_dim == 1024 and cfg.head_dim == 64 and cfg.num_heads == 16


def test_engram_27b_preset_has_paper_memory_width() -> None:
    assert EngramConfig.preset("engram-27b").memory_dim == 1280


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="demo"):
        EngramConfig.preset("huge")


def test_dict_round_trip_and_lists_become_tuples() -> None:
    cfg = EngramConfig.preset("tiny", seed=3)
    back = EngramConfig.from_dict(cfg.to_dict())
    assert back == cfg and isinstance(back.layer_ids, tuple)
    with pytest.raises(ValueError, match="unknown EngramConfig fields"):
        EngramConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngramConfig().seed = 1  # type: ignore[misc]
