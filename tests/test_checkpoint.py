"""Checkpoints: bitwise round trips, atomic writes, and refusal of anything broken."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engramlm.checkpoint import (
    LATEST,
    MANIFEST,
    MODEL_FILE,
    CheckpointError,
    capture_rng_state,
    check_compatible,
    checkpoint_dir,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)

VOCAB, DIM = 50, 16
CONFIG = {"model": {"vocab": VOCAB, "dim": DIM, "layer_ids": [1]}, "train": {"lr": 1e-2}}


class TinyLM(nn.Module):
    """Embedding -> linear -> LM head; ``sparse`` for SparseAdam, ``tied`` shares emb/head."""

    def __init__(self, sparse: bool = False, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, sparse=sparse)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:  # [B, T] -> [B, T, V]
        return self.head(torch.tanh(self.proj(self.emb(ids))))


def make_training(seed: int) -> tuple[TinyLM, dict[str, torch.optim.Optimizer]]:
    torch.manual_seed(seed)
    model = TinyLM(sparse=True)
    dense = [p for n, p in model.named_parameters() if not n.startswith("emb.")]
    optimizers: dict[str, torch.optim.Optimizer] = {
        "dense": torch.optim.AdamW(dense, lr=1e-2, betas=(0.8, 0.95)),
        "table": torch.optim.SparseAdam(list(model.emb.parameters()), lr=1e-2),
    }
    return model, optimizers


def train_step(model: TinyLM, optimizers: dict[str, torch.optim.Optimizer], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 8), generator=g)  # [B, T]
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    for opt in optimizers.values():
        opt.zero_grad()
    loss.backward()
    for opt in optimizers.values():
        opt.step()


def assert_bitwise_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}.{i}")
    else:
        assert a == b, where


def save_tiny(run_dir: Path, step: int, keep: int = 3) -> Path:
    model, optimizers = make_training(step)
    train_step(model, optimizers, step)
    return save_checkpoint(
        run_dir,
        step,
        model=model,
        optimizers=optimizers,
        trainer_state={"tokens_seen": 32 * step},
        config=CONFIG,
        keep=keep,
    )


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_round_trip_restores_model_optimizer_and_rng_bitwise(tmp_path: Path) -> None:
    model, optimizers = make_training(0)
    for s in range(3):
        train_step(model, optimizers, s)
    loader_rng = torch.Generator().manual_seed(7)
    torch.randint(0, 10, (5,), generator=loader_rng)
    trainer_state = {
        "tokens_seen": 96,
        "data": {"generator": loader_rng.get_state(), "epoch": 1, "offset": (3, 4)},
    }
    save_checkpoint(
        tmp_path,
        3,
        model=model,
        optimizers=optimizers,
        trainer_state=trainer_state,
        config=CONFIG,
        tokenizer_fingerprint="abc123",
    )
    draws = (random.random(), np.random.rand(), torch.rand(3))

    restored, restored_opts = make_training(1)
    record = load_checkpoint(
        tmp_path,
        model=restored,
        optimizers=restored_opts,
        config=CONFIG,
        tokenizer_fingerprint="abc123",
    )
    assert_bitwise_equal(model.state_dict(), restored.state_dict(), "model")
    for name in optimizers:
        assert_bitwise_equal(optimizers[name].state_dict(), restored_opts[name].state_dict(), name)
    assert_bitwise_equal((random.random(), np.random.rand(), torch.rand(3)), draws, "rng")
    assert record["step"] == 3 and record["path"] == checkpoint_dir(tmp_path, 3)
    assert_bitwise_equal({k: record[k] for k in trainer_state}, trainer_state, "trainer_state")

    train_step(model, optimizers, 99)
    train_step(restored, restored_opts, 99)
    assert_bitwise_equal(model.state_dict(), restored.state_dict(), "after one more step")


def test_rng_state_round_trips_through_capture_and_restore() -> None:
    state = capture_rng_state()
    first = (random.random(), np.random.randn(), torch.randn(4))
    restore_rng_state(state)
    assert_bitwise_equal((random.random(), np.random.randn(), torch.randn(4)), first)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    from safetensors import safe_open

    torch.manual_seed(0)
    model = TinyLM(tied=True)
    path = save_checkpoint(tmp_path, 1, model=model, optimizers={}, trainer_state={}, config={})
    with safe_open(path / MODEL_FILE, framework="pt") as f:
        assert len({"emb.weight", "head.weight"} & set(f.keys())) == 1

    torch.manual_seed(1)
    restored = TinyLM(tied=True)
    load_checkpoint(path, model=restored, optimizers=None)
    assert restored.head.weight is restored.emb.weight
    assert_bitwise_equal(model.state_dict(), restored.state_dict())


def test_truncated_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, 1)
    file = path / MODEL_FILE
    os.truncate(file, file.stat().st_size - 7)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: size mismatch, truncated"):
        verify_checkpoint(path)


def test_flipped_byte_is_refused_by_checksum(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, 1)
    file = path / MODEL_FILE
    data = bytearray(file.read_bytes())
    data[-10] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 checksum mismatch"):
        verify_checkpoint(path)


def test_unparsable_safetensors_header_is_refused(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, 1)
    (path / MODEL_FILE).write_bytes(b"\xff" * 64)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][MODEL_FILE] = {
        "bytes": 64,
        "sha256": hashlib.sha256(b"\xff" * 64).hexdigest(),
    }
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unparsable safetensors header"):
        verify_checkpoint(path)


def test_tokenizer_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    model, optimizers = make_training(0)
    save_checkpoint(
        tmp_path,
        1,
        model=model,
        optimizers=optimizers,
        trainer_state={},
        config=CONFIG,
        tokenizer_fingerprint="aaa",
    )
    with pytest.raises(CheckpointError, match="tokenizer_fingerprint: saved 'aaa', current 'bbb'"):
        load_checkpoint(tmp_path, model=model, optimizers=optimizers, tokenizer_fingerprint="bbb")


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    save_tiny(tmp_path, 1)
    path = save_tiny(tmp_path, 1)
    verify_checkpoint(path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [LATEST, path.name]


def test_model_only_load_ignores_saved_optimizers(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, 1)
    model, _ = make_training(4)
    assert load_checkpoint(path, model=model, optimizers={})["tokens_seen"] == 32


def test_reserved_trainer_state_keys_are_refused(tmp_path: Path) -> None:
    model, optimizers = make_training(0)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(
            tmp_path, 1, model=model, optimizers=optimizers, trainer_state={"rng": 1}, config={}
        )


def test_missing_manifest_is_refused_as_incomplete(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, 1)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path, model=TinyLM(sparse=True), optimizers=None)
    assert find_latest_checkpoint(tmp_path) is None


def test_corrupt_latest_falls_back_to_previous_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = save_tiny(tmp_path, 1)
    before = snapshot(first)
    second = save_tiny(tmp_path, 2)
    assert (tmp_path / "checkpoints" / LATEST).read_text().strip() == second.name
    data = bytearray((second / MODEL_FILE).read_bytes())
    data[-3] ^= 0xFF
    (second / MODEL_FILE).write_bytes(bytes(data))

    expected, expected_opts = make_training(1)
    train_step(expected, expected_opts, 1)
    model, optimizers = make_training(5)
    with caplog.at_level(logging.WARNING, logger="engramlm.checkpoint"):
        record = load_checkpoint(tmp_path, model=model, optimizers=optimizers)
    assert record["step"] == 1
    assert "model.safetensors" in caplog.text and "checksum" in caplog.text
    assert_bitwise_equal(model.state_dict(), expected.state_dict())
    assert snapshot(first) == before


def test_mismatched_config_is_refused_before_touching_the_model(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, 1)
    model, optimizers = make_training(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = {**CONFIG, "model": {**CONFIG["model"], "dim": 32}}
    with pytest.raises(CheckpointError, match=r"model\.dim: saved 16, current 32"):
        load_checkpoint(path, model=model, optimizers=optimizers, config=other)
    assert_bitwise_equal(model.state_dict(), before)


def test_check_compatible_lists_every_differing_key() -> None:
    saved = {"model": {"dim": 16, "layers": 2, "layer_ids": (1,)}, "vocab": 50}
    current = {"model": {"dim": 32, "layers": 2, "layer_ids": [1], "bias": True}}
    with pytest.raises(CheckpointError) as info:
        check_compatible(saved, current)
    message = str(info.value)
    assert "model.dim: saved 16, current 32" in message
    assert "model.bias: saved <absent>, current True" in message
    assert "vocab: saved 50, current <absent>" in message
    assert "layers" not in message and "layer_ids" not in message


def test_keep_prunes_all_but_the_newest(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_tiny(tmp_path, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [LATEST, "step_00000004", "step_00000005"]
    assert find_latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 5)


KILLED_SAVE = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from torch import nn
    from engramlm.checkpoint import save_checkpoint

    run_dir, marker, block_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_fsync, calls = os.fsync, [0]

    def slow_fsync(fd):
        # Stall at the chosen fsync so the parent can SIGKILL us mid-save.
        real_fsync(fd)
        calls[0] += 1
        if calls[0] == block_at:
            open(marker, "w").close()
            time.sleep(120)

    os.fsync = slow_fsync
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    save_checkpoint(run_dir, 2, model=model, optimizers={"adamw": opt},
                    trainer_state={"tokens_seen": 2}, config={})
    """
)


# fsync 1 follows model.safetensors; the 7th is the tmp directory's, just before the rename.
@pytest.mark.parametrize("block_at", [1, 7])
def test_kill_during_save_keeps_last_good_checkpoint(tmp_path: Path, block_at: int) -> None:
    good = save_tiny(tmp_path, 1)
    marker = tmp_path / "blocked"
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(tmp_path), str(marker), str(block_at)], env=env
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, "the saving subprocess exited before being killed"
            assert time.monotonic() < deadline, "the saving subprocess never reached its fsync"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    root = tmp_path / "checkpoints"
    leftovers = [p for p in root.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].is_dir()
    assert (leftovers[0] / MANIFEST).exists() == (block_at == 7)
    assert find_latest_checkpoint(tmp_path) == good
    model, optimizers = make_training(9)
    assert load_checkpoint(tmp_path, model=model, optimizers=optimizers)["step"] == 1

    save_tiny(tmp_path, 3)  # the next save cleans up after the crashed one
    assert not any(".tmp-" in p.name for p in root.iterdir())
