"""Over-Encoding, the §3.2 baseline: definition, causality, sparse rows, accounting, checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engramlm.checkpoint import load_checkpoint, save_checkpoint
from engramlm.config import EngramConfig, ModelConfig
from engramlm.model import EngramLM, model_stats
from engramlm.overencoding import OverEncoding
from engramlm.tables import OffloadedTable, TablePlan
from engramlm.train import TrainConfig, build_optimizers

OE = EngramConfig.preset("tiny", table_sizes=(101, 103), layer_ids=(0,))  # N=3, K=4, H=8
DENSE = ModelConfig.preset("tiny", overencoding=OE)  # no MoE: exact causality comparisons
MOE = ModelConfig.preset("tiny-moe", overencoding=OE)


def ids(cfg: ModelConfig, B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def build(cfg: ModelConfig, seed: int = 0, **kw: object) -> EngramLM:
    torch.manual_seed(seed)
    return EngramLM(cfg, **kw).eval()


def test_output_is_the_mean_of_token_and_per_head_projected_rows() -> None:
    oe = OverEncoding(OE, hidden_size=32, vocab_size=256)
    x = ids(DENSE, 2, 9)
    tok = torch.randn(2, 9, 32)
    got, _ = oe(tok, x)
    rows = oe.hash_ids(x) + oe.offsets  # [B, T, H]
    hd, H = OE.head_dim, OE.num_heads
    # Reference: each head's row through its own slice P_h of the projection, 1 + H averaged.
    total = tok.clone()
    for h in range(H):
        P_h = oe.proj.weight[:, h * hd : (h + 1) * hd]  # [D, hd]
        total = total + oe.table.weight[rows[..., h]] @ P_h.T
    torch.testing.assert_close(got, total / (1 + H))
    assert got.shape == (2, 9, 32)


def test_hashing_uses_raw_ids_and_the_raw_pad() -> None:
    oe = OverEncoding(OE, hidden_size=32, vocab_size=256)
    x = ids(DENSE, 1, 5)
    pad = torch.full((1, 2), OE.pad_id)
    assert torch.equal(oe.hash_ids(x), oe.hash_ids(x, prefix=pad))


def test_model_with_overencoding_is_causal() -> None:
    model = build(DENSE)
    x = ids(DENSE, 2, 12)
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % DENSE.vocab_size
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_decode_matches_full_forward(cfg: ModelConfig) -> None:
    model = build(cfg)
    x = ids(cfg, 2, 10)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        steps = [model(x[:, :4], cache=cache).logits]
        steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_only_addressed_rows_get_gradients() -> None:
    model = build(DENSE).train()
    x = ids(DENSE, 2, 6)
    model(x, targets=x).loss.backward()
    oe = model.overencoding
    assert oe is not None
    addressed = (oe.hash_ids(x) + oe.offsets).unique()
    touched = oe.table.weight.grad.abs().sum(-1).nonzero().flatten()
    assert torch.equal(touched, addressed)


def test_tables_train_with_the_engram_table_optimiser() -> None:
    model = build(MOE)
    cfg = TrainConfig(lr=1e-3, table_lr_mult=5.0)
    optimizers = build_optimizers(model, cfg)
    table = model.overencoding.table.weight
    assert [p for g in optimizers["tables"].param_groups for p in g["params"]] == [table]
    assert isinstance(optimizers["tables"], torch.optim.SparseAdam)
    assert all(p is not table for p in model.dense_parameters())


def test_param_accounting_equals_numel() -> None:
    model = build(MOE)
    stats = model_stats(MOE)
    assert stats.total_params == sum(p.numel() for p in model.parameters())
    assert stats.overencoding_table_params == model.overencoding.table.weight.numel()
    assert stats.overencoding_dense_params == model.overencoding.proj.weight.numel()
    assert stats.engram_table_params == 0


def test_same_shape_gives_engram_and_overencoding_equal_table_params() -> None:
    engram = dataclasses.replace(OE, layer_ids=(1,), hc_mult=1)
    with_engram = model_stats(ModelConfig.preset("tiny-moe", engram=engram))
    assert with_engram.engram_table_params == model_stats(MOE).overencoding_table_params


def test_checkpoint_round_trip_restores_table_and_optimizer(tmp_path: Path) -> None:
    model = build(MOE, seed=0).train()
    optimizers = build_optimizers(model, TrainConfig(lr=1e-2))
    x = ids(MOE, 2, 8)
    model(x, targets=x).loss.backward()
    for opt in optimizers.values():
        opt.step()
    config = {"model": MOE.to_dict()}
    save_checkpoint(
        tmp_path, 1, model=model, optimizers=optimizers, trainer_state={}, config=config
    )
    restored = build(MOE, seed=1)
    restored_opts = build_optimizers(restored, TrainConfig(lr=1e-2))
    load_checkpoint(tmp_path, model=restored, optimizers=restored_opts, config=config)
    for (name, a), b in zip(
        model.state_dict().items(), restored.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    state = optimizers["tables"].state_dict()["state"]
    restored_state = restored_opts["tables"].state_dict()["state"]
    assert torch.equal(state[0]["exp_avg"], restored_state[0]["exp_avg"])
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, restored.eval()(x).logits)


def test_host_table_gives_the_device_result() -> None:
    device = build(MOE)
    host = build(MOE, tables=TablePlan("host"))
    assert isinstance(host.overencoding.table, OffloadedTable)
    x = ids(MOE, 2, 8)
    with torch.no_grad():
        torch.testing.assert_close(host(x).logits, device(x).logits)


def test_meta_device_build_then_init_restores_constants() -> None:
    ref = build(MOE)
    with torch.device("meta"):
        model = EngramLM(MOE)
    model.to_empty(device="cpu")
    model.init_weights()
    for (name, got), want in zip(model.named_buffers(), ref.buffers(), strict=True):
        assert torch.equal(got, want), name
    assert torch.equal(model.overencoding.hasher.mod_0, ref.overencoding.hasher.mod_0)


def test_config_round_trips_and_leaves_plain_configs_unchanged() -> None:
    assert ModelConfig.from_dict(MOE.to_dict()) == MOE
    assert "overencoding" not in ModelConfig.preset("tiny-moe").to_dict()


def test_overencoding_off_layer_zero_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="overencoding.layer_ids"):
        ModelConfig.preset("tiny", overencoding=dataclasses.replace(OE, layer_ids=(1,)))
