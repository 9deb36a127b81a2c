"""`alexnet2gpu train` under torchrun with the ``replicas`` (DDP) and ``hybrid`` (2014:
data-parallel conv trunk, tensor-parallel fc6-fc8) placements: the logged losses and
accuracies equal a one-process run's, checkpoints hold the single-device names as plain
full tensors and move between the placements, a run resumed in its own placement is bit
for bit the unbroken run (dropout on), and hybrid's evaluation runs shares that differ.
Tiny nets, synthetic data, 2 gloo processes."""

from __future__ import annotations

import json

import pytest
import torch

from alexnet2gpu.cli import main
from alexnet2gpu.errors import ConfigError
from alexnet2gpu.io.checkpoints import load_checkpoint
from alexnet2gpu.parallel import Layout
from alexnet2gpu.train import TrainConfig, train
from alexnet2gpu.train.checkpointing import seed_replica_rng

from .dist_launch import run_torchrun
from .test_train import _small_fashion_mnist
from .tiny import tiny, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_process(model: str, **extra) -> TrainConfig:
    """The tiny ``model`` on synthetic data in one process: 2 classes (so that accuracy is
    not always 0), a global batch of 8, dropout 0 unless ``extra`` says otherwise."""
    kw = dict(model=model, data="synthetic", **tiny(model), num_classes=2, batch_size=8, devices="cpu", dropout=0.0)
    kw["placement"] = "towers" if model == "dual" else "single"
    return TrainConfig(**{**kw, **extra})


def _launch(model: str, placement: str, *flags: str, dropout: str = "0"):
    """The same run under torchrun, 2 processes; fails the test with its stderr if it fails."""
    argv = ["-m", "alexnet2gpu", "train", "--data", "synthetic", *tiny_args(model), "--num-classes", "2"]
    argv += ["--batch-size", "8", "--dropout", dropout, "--placement", placement, "--quiet", *flags]
    result = run_torchrun(2, argv, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.orphans
    return result


def _records(path) -> tuple[dict[int, tuple[float, float]], list[dict]]:
    """{step: (loss, accuracy)} and the evaluation records of a metrics file."""
    lines = [json.loads(line) for line in open(path)]
    steps = {r["step"]: (r["loss"], r["accuracy"]) for r in lines if r["event"] == "step"}
    keys = ("step", "test_accuracy", "test_images", "val_accuracy", "val_images")
    return steps, [{k: r[k] for k in keys} for r in lines if r["event"] == "eval"]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    """The same names in the same order, every tensor within ``tol`` of its largest magnitude."""
    assert list(got) == list(want)
    for name in want:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=tol * scale, msg=name)


def _assert_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _ckpt(folder, step: int):
    return folder / f"step-{step:08d}.pt"


# --------------------------------------------------------------------------- in one process


@pytest.mark.parametrize("placement", ["replicas", "hybrid"])
def test_compile_under_a_process_placement_is_refused_in_one_line(capsys, monkeypatch, placement):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["train", *tiny_args("simplified"), "--data", "synthetic", "--steps", "1", "--compile"]
    code = main([*argv, "--placement", placement])
    err = capsys.readouterr().err
    assert code == 2 and f"under {placement}" in err and len(err.strip().splitlines()) == 1


def test_replicas_draw_their_own_dropout_streams_the_same_for_a_seed():
    cpu = (torch.device("cpu"),)

    def stream(placement: str, rank: int, seed: int = 0) -> torch.Tensor:
        layout = Layout(placement, cpu, world_size=2, dp_size=2, rank=rank, two_tower_net=False)
        torch.manual_seed(123)
        seed_replica_rng(layout, seed)
        return torch.rand(4)

    assert torch.equal(stream("replicas", 0), stream("replicas", 0))
    assert not torch.equal(stream("replicas", 0), stream("replicas", 1))
    assert not torch.equal(stream("hybrid", 1), stream("hybrid", 1, seed=1))
    torch.manual_seed(123)
    seed_replica_rng(Layout("single", cpu, two_tower_net=False), 0)  # one process keeps its stream
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(123)))


# --------------------------------------------------------------------------- under torchrun


@pytest.mark.distributed
@pytest.mark.parametrize(
    "model, placement",
    [("simplified", "auto"), ("dual", "replicas"), ("simplified", "hybrid")],
    ids=["simplified-auto-replicas", "dual-replicas", "simplified-hybrid"],
)
def test_two_processes_log_the_one_process_losses_and_resume_on_one(tmp_path, model, placement):
    """Losses equal within float tolerance (the gradients are summed in another order),
    accuracies and evaluations exactly; the 2-process run's step-2 checkpoint resumed in
    one process ends at the one-process run's weights."""
    one = train(_one_process(model, steps=4, checkpoint_dir=str(tmp_path / "one"), metrics=str(tmp_path / "1.jsonl")))
    assert one.steps == 4
    flags = ["--steps", "4", "--checkpoint-dir", str(tmp_path / "two"), "--checkpoint-every", "2"]
    result = _launch(model, placement, *flags, "--metrics", str(tmp_path / "2.jsonl"))
    words = "(trunk x 2 replicas, fc6-fc8 split 2 ways)" if placement == "hybrid" else "(2 replicas)"  # auto: replicas
    assert f"on 2 processes {words}" in result.stdout and result.stdout.count("train acc") == 1  # rank 0 only
    (want, want_evals), (got, got_evals) = _records(tmp_path / "1.jsonl"), _records(tmp_path / "2.jsonl")
    assert sorted(got) == [1, 2, 3, 4] and got_evals == want_evals
    for step, (loss, accuracy) in want.items():
        torch.testing.assert_close(got[step][0], loss, rtol=1e-5, atol=0, msg=f"step {step}")
        assert got[step][1] == accuracy, f"step {step}"
    final = _weights(_ckpt(tmp_path / "one", 4))
    _assert_close(_weights(_ckpt(tmp_path / "two", 4)), final)
    # 2 processes -> one process
    train(_one_process(model, steps=4, checkpoint_dir=str(tmp_path / "back"), resume=str(_ckpt(tmp_path / "two", 2))))
    _assert_close(_weights(_ckpt(tmp_path / "back", 4)), final)


@pytest.mark.distributed
def test_hybrid_checkpoints_are_plain_full_tensors_and_move_to_and_from_one_process(tmp_path):
    """One process -> hybrid and -> replicas, and hybrid -> one process, all ending at the
    unbroken one-process run's weights (within float tolerance: the placements sum the
    gradients in another order, so bit-equality cannot hold across them); the hybrid
    checkpoint evaluates on one device to the one-process run's accuracy."""
    from alexnet2gpu.checks.evaluate import evaluate_checkpoint

    train(_one_process("simplified", steps=4, checkpoint_dir=str(tmp_path / "one"), checkpoint_every=2))
    final = _weights(_ckpt(tmp_path / "one", 4))
    for placement in ("hybrid", "replicas"):
        _launch(
            "simplified",
            placement,
            *["--steps", "4", "--checkpoint-dir", str(tmp_path / placement)],
            *["--resume", str(_ckpt(tmp_path / "one", 2))],
        )
        _assert_close(_weights(_ckpt(tmp_path / placement, 4)), final)
    state = load_checkpoint(_ckpt(tmp_path / "hybrid", 4))
    reference = load_checkpoint(_ckpt(tmp_path / "one", 4))
    assert all(type(v) is torch.Tensor for v in state["model"].values())
    assert list(state["optimizer"]["state"]) == list(reference["optimizer"]["state"])
    for name, entry in state["optimizer"]["state"].items():
        buffer = entry["momentum_buffer"]
        assert type(buffer) is torch.Tensor and buffer.shape == reference["model"][name].shape, name
        torch.testing.assert_close(buffer, reference["optimizer"]["state"][name]["momentum_buffer"], rtol=0, atol=1e-5)
    assert state["config"]["placement"] == "hybrid" and state["config"]["world_size"] == 2
    # hybrid -> one process: its step-4 checkpoint resumed on one device to step 6, beside the unbroken run
    train(_one_process("simplified", steps=6, checkpoint_dir=str(tmp_path / "one6")))
    train(
        _one_process(
            "simplified", steps=6, checkpoint_dir=str(tmp_path / "h1"), resume=str(_ckpt(tmp_path / "hybrid", 4))
        )
    )
    _assert_close(_weights(_ckpt(tmp_path / "h1", 6)), _weights(_ckpt(tmp_path / "one6", 6)))
    got = evaluate_checkpoint(_ckpt(tmp_path / "hybrid", 4), placement="single", devices="cpu")
    want = evaluate_checkpoint(_ckpt(tmp_path / "one", 4), placement="single", devices="cpu")
    assert (got.images, got.top1) == (want.images, want.top1)
    with pytest.raises(ConfigError, match="evaluate runs in one process: use --placement single"):
        evaluate_checkpoint(_ckpt(tmp_path / "hybrid", 4), placement="hybrid")


@pytest.mark.distributed
# hybrid fp32 is the fp16 case without its scaler: the two here cover every saved stream (suite time)
@pytest.mark.parametrize("placement, precision", [("replicas", "fp32"), ("hybrid", "fp16")])
def test_a_resumed_run_is_bit_for_bit_the_unbroken_one_with_dropout(tmp_path, placement, precision):
    """Dropout 0.5: each replica's masks come from its own global RNG, saved per replica
    and restored, so the resumed run draws the unbroken run's masks. fp16: hybrid's
    DTensor gradients go through the loss scaler, whose state is saved too."""
    flags = ["--steps", "4", "--checkpoint-every", "2", "--precision", precision]
    _launch("simplified", placement, *flags, "--checkpoint-dir", str(tmp_path / "a"), dropout="0.5")
    resume = ["--resume", str(_ckpt(tmp_path / "a", 2))]
    _launch("simplified", placement, *flags, "--checkpoint-dir", str(tmp_path / "b"), *resume, dropout="0.5")
    saved = load_checkpoint(_ckpt(tmp_path / "a", 2))["rng"]["replica_global"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])
    _assert_equal(_weights(_ckpt(tmp_path / "b", 4)), _weights(_ckpt(tmp_path / "a", 4)))
    scaler = load_checkpoint(_ckpt(tmp_path / "b", 4))["scaler"]
    assert (scaler is not None) == (precision == "fp16")


@pytest.mark.distributed
@pytest.mark.parametrize("placement", ["hybrid"])  # replicas' evaluation has no collective to hang on
def test_evaluation_runs_shares_that_differ_in_size_and_count(tmp_path, placement):
    """41 test images over 2 processes at 4 a batch: shares of 21 and 20, six batches and
    five. Hybrid's forward is a collective, so the short share runs padding, counted for
    nothing (without it the job fails at the evaluation); DDP's forward in evaluation is
    not, and runs the shares as they are. The accuracy over all 41 equals one process's."""
    data = dict(data="fashion-mnist", data_dir=_small_fashion_mnist(tmp_path / "fm", count=41), train_subset=32)
    one = _one_process("simplified", **data, num_classes=None, epochs=1, workers=0, metrics=str(tmp_path / "1.jsonl"))
    train(one)
    argv = ["-m", "alexnet2gpu", "train", *tiny_args("simplified"), "--data", "fashion-mnist"]
    argv += ["--data-dir", data["data_dir"], "--train-subset", "32", "--epochs", "1", "--workers", "0"]
    argv += ["--batch-size", "8", "--dropout", "0", "--placement", placement, "--quiet"]
    result = run_torchrun(2, [*argv, "--metrics", str(tmp_path / "2.jsonl")], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    (_, want), (_, got) = _records(tmp_path / "1.jsonl"), _records(tmp_path / "2.jsonl")
    assert want[-1]["test_images"] == 41 and got == want
