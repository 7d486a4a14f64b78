"""``torch.compile(model)`` equals eager: a training step's loss and gradients, and KV-cached
greedy decoding with the table in memory and on the host tier (whose lookups run eagerly
between compiled graphs; ``OffloadedTable``).

Every test runs with the ``aot_eager`` backend, which traces the model as ``torch.compile``
does (graph capture, guards, the decode cache mutated from inside the graph, dynamic shapes,
autograd) without generating kernels; with ``ENGRAMLM_TEST_INDUCTOR=1`` also with the default
backend, inductor, whose C++ kernel builds take ~5 minutes per test on 2 busy cores with a cold
cache (passed on 2026-12-01, issue 16).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from engramlm.config import EngramConfig, ModelConfig
from engramlm.generate import generate_tokens
from engramlm.model import EngramLM
from engramlm.tables import TablePlan, convert_table

# Tracing alone takes 10-90 s per test on 2 busy cores (~80 s CPU for the three here).
pytestmark = pytest.mark.slow
BACKENDS = [
    "aot_eager",
    pytest.param(
        "inductor",
        marks=pytest.mark.skipif(
            not os.environ.get("ENGRAMLM_TEST_INDUCTOR"),
            reason="inductor builds C++ kernels, ~5 min per test on 2 cores with a cold "
            "cache: set ENGRAMLM_TEST_INDUCTOR=1",
        ),
    ),
]

CONFIG = dataclasses.replace(
    ModelConfig.preset("tiny-mhc"),
    engram=dataclasses.replace(
        EngramConfig.preset("tiny"), table_sizes=(101, 103), layer_ids=(0,), hc_mult=2
    ),
    num_layers=2,
    hc_mult=2,
)


def build(plan: TablePlan | None = None) -> EngramLM:
    """The same seeded model on any tier, its short conv non-zero so the decode state shows."""
    torch.manual_seed(0)
    reference = EngramLM(CONFIG)
    with torch.no_grad():
        for block in reference.layers:
            if block.engram is not None:
                block.engram.short_conv.weight.normal_(std=0.3)
    if plan is None:
        return reference
    model = EngramLM(CONFIG, tables=plan)
    model.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if "table" not in k}, strict=False
    )
    for src, dst in zip(reference.engram_tables(), model.engram_tables(), strict=True):
        convert_table(src, dst)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_compiled_training_step_has_eager_loss_and_gradients(backend: str, sparse: bool) -> None:
    """Also with the sparse table gradients training uses (SparseAdam), which inductor cannot
    compile: the lookup runs eagerly between compiled graphs (``DeviceTable``)."""
    eager = build().train()
    compiled_model = build().train()
    for table in (*eager.engram_tables(), *compiled_model.engram_tables()):
        table.sparse_grad = sparse
    compiled = torch.compile(compiled_model, backend=backend)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12))
    targets = ids.roll(-1, dims=1)
    loss_eager = eager(ids, targets=targets).loss
    loss_compiled = compiled(ids, targets=targets).loss
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    grads = dict(compiled_model.named_parameters())
    for name, p in eager.named_parameters():
        assert p.grad is not None, name
        got, expected = grads[name].grad, p.grad
        assert got.is_sparse == expected.is_sparse == (sparse and "table" in name), name
        if expected.is_sparse:
            got, expected = got.to_dense(), expected.to_dense()
        scale = expected.abs().max().item()  # sums in another order: tolerance relative to it
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5 * scale + 1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", ["device", "host"])
def test_compiled_decoding_equals_eager(tier: str, backend: str) -> None:
    eager = build(TablePlan(kind=tier)).eval()
    compiled = torch.compile(build(TablePlan(kind=tier)).eval(), backend=backend, dynamic=True)
    prompt = torch.randint(0, CONFIG.vocab_size, (2, 5))
    expected = torch.stack(list(generate_tokens(eager, prompt, 6, temperature=0)), 1)
    got = torch.stack(list(generate_tokens(compiled, prompt, 6, temperature=0)), 1)
    assert torch.equal(got, expected)
    # The logits too, step by step, from the same cache contents.
    cache_e, cache_c = eager.new_cache(), compiled.new_cache()
    tokens = torch.cat([prompt, expected], dim=1)
    with torch.no_grad():
        for t in range(prompt.shape[1] - 1, tokens.shape[1]):
            chunk = tokens[:, : t + 1] if t == prompt.shape[1] - 1 else tokens[:, t : t + 1]
            torch.testing.assert_close(
                compiled(chunk, cache=cache_c).logits, eager(chunk, cache=cache_e).logits
            )
