"""Checkpoints: atomic writes, sha256 sidecars, refusal of damaged and hostile files,
the newest valid checkpoint after a kill, and RNG state that continues exactly."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from alexnet2gpu import build_model
from alexnet2gpu.errors import CheckpointError, ConfigError
from alexnet2gpu.io.checkpoints import (
    checkpoint_path,
    load_checkpoint,
    newest_checkpoint,
    save_checkpoint,
    save_in_directory,
)
from alexnet2gpu.train.checkpointing import capture_rng_state, restore_rng_state

from .tiny import TINY_SIZE, tiny


def _state(step: int, n: int = 16) -> dict:
    return {"step": step, "weights": torch.full((n,), float(step)), "name": "x"}


def test_round_trip_and_sidecar_is_sha256sum_format(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", _state(3))
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and loaded["name"] == "x"
    torch.testing.assert_close(loaded["weights"], torch.full((16,), 3.0))
    sidecar = tmp_path / "a.pt.sha256"
    assert sidecar.read_text().endswith("  a.pt\n")
    check = subprocess.run(["sha256sum", "-c", sidecar.name], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "a.pt.sha256"]  # no temporary left


def test_truncated_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", _state(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or was modified"):
        load_checkpoint(path)


def test_truncated_file_with_matching_digest_is_refused(tmp_path):
    # Damaged before it was hashed: the digest matches, torch's reader must still refuse it.
    path = save_checkpoint(tmp_path / "a.pt", _state(1))
    data = path.read_bytes()[:200]
    save_checkpoint(tmp_path / "b.pt", {})  # a sidecar to rewrite
    (tmp_path / "b.pt").write_bytes(data)
    import hashlib

    (tmp_path / "b.pt.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  b.pt\n")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "b.pt")


def test_flipped_byte_in_a_tensor_is_caught_by_the_digest(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", {"w": torch.ones(1024)})
    data = bytearray(path.read_bytes())
    at = data.find(b"\x00\x00\x80\x3f" * 64)  # inside the float32 ones
    assert at > 0
    data[at + 2] ^= 0x01
    path.write_bytes(bytes(data))
    # torch's own loader does not notice: this is why the sidecar exists.
    assert not torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(1024))
    with pytest.raises(CheckpointError, match="corrupt or was modified"):
        load_checkpoint(path)


class _RunsCode:
    """A pickle that creates a file when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    # An attacker can write a matching sidecar too: the digest is not a defence here.
    path = save_checkpoint(tmp_path / "evil.pt", {"model": _RunsCode(marker)})
    with pytest.raises(CheckpointError, match="refused: .*GLOBAL.*system"):
        load_checkpoint(path)
    assert not marker.exists()
    # The file really is hostile: unsafe loading would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_plain_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = save_checkpoint(tmp_path / "evil.pt", {})
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    import hashlib

    (tmp_path / "evil.pt.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  evil.pt\n")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_sidecar_and_missing_file(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", _state(1))
    (tmp_path / "a.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match="no sha256 file a.pt.sha256"):
        load_checkpoint(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_newest_valid_checkpoint_and_keep(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40):
        save_in_directory(tmp_path, step, _state(step), keep=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"step-000000{s}.pt{x}" for s in (20, 30, 40) for x in ("", ".sha256")]
    assert newest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 40)
    # The newest damaged, the next without its sidecar (a crash between the two writes).
    newest = checkpoint_path(tmp_path, 40)
    newest.write_bytes(newest.read_bytes()[:-10])
    (tmp_path / "step-00000030.pt.sha256").unlink()
    assert newest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 20)
    (tmp_path / "step-00000020.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints"):
        newest_checkpoint(tmp_path)
    with pytest.raises(ConfigError):
        newest_checkpoint(tmp_path / "missing")


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from alexnet2gpu.io.checkpoints import save_in_directory
    directory = sys.argv[1]
    for step in range(1, 10_000):
        save_in_directory(directory, step, {"step": step, "w": torch.full((8_000_000,), float(step))}, keep=2)
    """
)


def test_kill_while_writing_leaves_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of a 32 MB write: the newest complete checkpoint loads."""
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        # Wait for one complete checkpoint, then for the next write to be under way.
        while not list(tmp_path.glob("step-*.pt.sha256")):
            assert time.monotonic() < deadline and writer.poll() is None, "writer never finished a checkpoint"
            time.sleep(0.005)
        while not list(tmp_path.glob(".step-*.pt.*.tmp")):
            assert time.monotonic() < deadline and writer.poll() is None, "writer never started a second write"
            time.sleep(0.001)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL
    path = newest_checkpoint(tmp_path)
    assert path is not None
    state = load_checkpoint(path)
    assert path == checkpoint_path(tmp_path, state["step"])
    assert torch.equal(state["w"][:3], torch.full((3,), float(state["step"])))


def _tiny_dual() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("dual", **tiny("dual"), num_classes=5).train()


def test_rng_state_continues_exactly_through_a_checkpoint(tmp_path):
    x = torch.randn(2, 3, TINY_SIZE["dual"], TINY_SIZE["dual"])
    model = _tiny_dual()
    model(x)  # the dropout generators now exist and have advanced
    save_checkpoint(tmp_path / "rng.pt", {"model": model.state_dict(), "rng": capture_rng_state(model)})
    expected = (model(x), torch.rand(3), random.random())

    resumed = _tiny_dual()  # a fresh process: generators not created yet
    assert all(m.generator is None for m in resumed.modules() if hasattr(m, "generator"))
    state = load_checkpoint(tmp_path / "rng.pt")
    resumed.load_state_dict(state["model"])
    restore_rng_state(resumed, state["rng"])
    generators = [m.generator for m in resumed.modules() if hasattr(m, "generator")]
    assert len(generators) == 2 and all(g is not None and g.device.type == "cpu" for g in generators)
    got = (resumed(x), torch.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    assert got[2] == expected[2]


def test_lazy_generator_stays_lazy_and_matches(tmp_path):
    x = torch.randn(2, 3, TINY_SIZE["dual"], TINY_SIZE["dual"])
    model = _tiny_dual()
    state = capture_rng_state(model)  # before any forward: no generator yet
    expected = model(x)
    resumed = _tiny_dual()
    resumed.load_state_dict(model.state_dict())
    restore_rng_state(resumed, state)
    assert all(m.generator is None for m in resumed.modules() if hasattr(m, "generator"))
    torch.testing.assert_close(resumed(x), expected, rtol=0, atol=0)


def test_data_position_and_rng_resume_a_training_run_bit_for_bit(tmp_path):
    """The pieces a training loop saves (model, optimizer, RNG, data position) give the
    same losses and weights after a resume as a run that never stopped."""
    import gzip

    from alexnet2gpu.data import build_loaders

    folder = tmp_path / "fm"  # a tiny Fashion-MNIST: 40 train and 8 test images
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("t10k", 8)):
        images = torch.randint(0, 256, (n, 28, 28), generator=rng, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=rng, dtype=torch.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (folder / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.numpy().tobytes()))

    def run(steps, resume_from=None, stop_at=None):
        torch.manual_seed(0)
        model = build_model("dual", **tiny("dual"), num_classes=10).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        loader = build_loaders(
            "fashion-mnist", image_size=TINY_SIZE["dual"], in_channels=3, global_batch=8, seed=7, data_dir=folder
        ).train
        step, losses = 0, []
        if resume_from is not None:
            state = load_checkpoint(resume_from)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            restore_rng_state(model, state["rng"])
            loader.load_state_dict(state["data"])
            step = state["step"]
        while step < steps:
            loader.set_epoch(loader.state_dict()["epoch"])
            for images, labels in loader:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
                if step == stop_at:
                    save_in_directory(
                        tmp_path / "ckpt",
                        step,
                        {
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "rng": capture_rng_state(model),
                            "data": loader.state_dict(),
                            "step": step,
                        },
                    )
                    return losses, model
                if step == steps:
                    break
        return losses, model

    unbroken_losses, unbroken = run(8)  # 5 batches an epoch: the run crosses an epoch
    first_losses, _ = run(8, stop_at=3)
    resumed_losses, resumed = run(8, resume_from=newest_checkpoint(tmp_path / "ckpt"))
    assert first_losses + resumed_losses == unbroken_losses
    for (name, a), (_, b) in zip(unbroken.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_in_directory(tmp_path, 1, _state(1))

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*step-00000002.pt: No space left on device"):
        save_in_directory(tmp_path, 2, _state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001.pt", "step-00000001.pt.sha256"]
    assert newest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)
