"""`alexnet2gpu train --precision bf16|fp16`: the step runs under autocast (training and
evaluation), fp16 scales its loss and the scaler's state travels in checkpoints, a resumed
run continues bit for bit in every precision, a checkpoint of another precision is refused,
the config record says what the run computed in, and under ``ranks`` every rank agrees
when fp16's scaled gradients overflow. Tiny nets, synthetic data, the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from alexnet2gpu.cli import main
from alexnet2gpu.cli import train as train_cli
from alexnet2gpu.errors import ConfigError
from alexnet2gpu.io.checkpoints import load_checkpoint
from alexnet2gpu.train import TrainConfig, train

from .dist_launch import run_torchrun, torchrun_env
from .test_train import TINY, TINY_FLAGS, _assert_weights_close
from .tiny import TINY_ARGS

pytestmark = pytest.mark.usefixtures("one_thread")


def _events(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _steps(path) -> dict[int, dict]:
    return {e["step"]: e for e in _events(path) if e["event"] == "step"}


# --------------------------------------------------------------------------- the flags


def test_an_unknown_precision_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exited:  # argparse's own refusal of a choice
        main(["train", *TINY_ARGS, "--data", "synthetic", "--steps", "1", "--quiet", "--precision", "fp8"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--precision" in err and "fp8" in err and "bf16" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(ConfigError, match="unknown precision 'fp8': choose one of fp32, bf16, fp16"):
        TrainConfig(precision="fp8")


def test_the_precision_flags_reach_their_fields():
    import argparse

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    default = train_cli.config_from_args(parser.parse_args([]))
    assert (default.precision, default.channels_last, default.cudnn_benchmark) == ("fp32", False, True)
    args = parser.parse_args(["--precision", "fp16", "--channels-last", "--no-cudnn-benchmark"])
    config = train_cli.config_from_args(args)
    assert (config.precision, config.channels_last, config.cudnn_benchmark) == ("fp16", True, False)


# --------------------------------------------------------------------------- the step


def test_bf16_trains_and_evaluates_under_autocast_and_records_it(tmp_path):
    seen: dict[bool, set] = {True: set(), False: set()}  # module.training -> conv output dtypes

    def hook(module, args, output):
        if isinstance(module, nn.Conv2d):
            seen[module.training].add(output.dtype)

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        result = train(
            TrainConfig(**TINY, steps=2, precision="bf16", channels_last=True, metrics=str(tmp_path / "m.jsonl"))
        )
    finally:
        handle.remove()
    assert seen[True] == {torch.bfloat16} and seen[False] == {torch.bfloat16}  # training and evaluation
    assert result.steps == 2 and result.test_accuracy is not None
    config = _events(tmp_path / "m.jsonl")[0]
    assert config["event"] == "config" and config["settings"]["precision"] == "bf16"
    assert config["precision"] == "bf16" and config["memory_format"] == "channels_last"
    assert config["cudnn_benchmark"] is False  # on the CPU --cudnn-benchmark leaves torch's setting alone
    assert {"tf32_matmul", "tf32_cudnn", "float32_matmul_precision"} <= set(config)
    assert all("loss_scale" not in s for s in _steps(tmp_path / "m.jsonl").values())  # bf16 scales nothing


def test_fp32_records_its_precision_and_runs_no_autocast(tmp_path):
    seen = set()
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, a, out: seen.add(out.dtype) if isinstance(m, nn.Conv2d) else None
    )
    try:
        train(TrainConfig(**TINY, steps=1, metrics=str(tmp_path / "m.jsonl")))
    finally:
        handle.remove()
    assert seen == {torch.float32}
    config = _events(tmp_path / "m.jsonl")[0]
    assert (config["precision"], config["memory_format"]) == ("fp32", "contiguous")


def test_fp16_overflow_is_skipped_by_the_scaler_not_a_fault(tmp_path):
    # Scaled by 65,536 the tiny net's float16 gradients overflow within its first steps:
    # GradScaler skips those steps and halves its scale; --on-nonfinite stop stays quiet.
    result = train(TrainConfig(**TINY, steps=6, precision="fp16", metrics=str(tmp_path / "m.jsonl")))
    steps = _steps(tmp_path / "m.jsonl")
    overflows = [s for s, e in steps.items() if e["skipped"]]
    assert overflows and result.overflow_steps == len(overflows) and result.skipped_steps == 0
    first = overflows[0]
    assert steps[first]["loss_scale"] == 65536.0 and steps[first + 1]["loss_scale"] == 32768.0
    assert all(e["loss"] == e["loss"] for e in steps.values())  # the losses themselves stay finite


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_is_bit_exact_in_low_precision(tmp_path, precision):
    cfg = dict(TINY, dropout=0.5, precision=precision)
    train(TrainConfig(**cfg, steps=6, checkpoint_dir=str(tmp_path / "a"), metrics=str(tmp_path / "a.jsonl")))
    train(TrainConfig(**cfg, steps=4, checkpoint_dir=str(tmp_path / "b")))
    train(
        TrainConfig(**cfg, steps=6, checkpoint_dir=str(tmp_path / "b"), resume=True, metrics=str(tmp_path / "b.jsonl"))
    )
    a, b = _steps(tmp_path / "a.jsonl"), _steps(tmp_path / "b.jsonl")
    assert sorted(b) == [5, 6] and all(a[s] == {**b[s], "images_per_s": a[s]["images_per_s"]} for s in b)
    end_a = load_checkpoint(tmp_path / "a" / "step-00000006.pt")
    end_b = load_checkpoint(tmp_path / "b" / "step-00000006.pt")
    for name, value in end_a["model"].items():
        assert torch.equal(value, end_b["model"][name]), name
    assert end_a["scaler"] == end_b["scaler"] and end_a["config"]["precision"] == precision
    if precision == "fp16":
        middle = load_checkpoint(tmp_path / "b" / "step-00000004.pt")["scaler"]
        # an overflow before the checkpoint: the resumed run continues from the lowered scale
        assert middle["scale"] < 65536.0 and set(middle) >= {"scale", "_growth_tracker", "growth_interval"}
    else:
        assert end_a["scaler"] is None


def test_the_fp16_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    from alexnet2gpu.train.loop import _prepare, resolve_run_layout

    train(TrainConfig(**TINY, steps=4, precision="fp16", checkpoint_dir=str(tmp_path)))
    saved = load_checkpoint(tmp_path / "step-00000004.pt")["scaler"]
    config = TrainConfig(**TINY, steps=5, precision="fp16", checkpoint_dir=str(tmp_path), resume=True)
    run = _prepare(config, resolve_run_layout(config), None)
    assert run.scaler.is_enabled() and run.scaler.state_dict() == saved
    assert run.step == 4


def test_resume_refuses_a_checkpoint_of_another_precision(tmp_path):
    train(TrainConfig(**TINY, steps=2, checkpoint_dir=str(tmp_path)))
    source = tmp_path / "step-00000002.pt"
    with pytest.raises(ConfigError) as refused:
        train(TrainConfig(**TINY, steps=3, precision="bf16", resume=str(source)))
    assert str(refused.value) == (
        f"checkpoint {source} was written by a run in --precision fp32; this run has --precision bf16: resume "
        f"with --precision fp32, or start a new run from its weights with --weights {source}"
    )
    started = train(TrainConfig(**TINY, steps=1, precision="bf16", weights=str(source)))  # weights: any precision
    assert started.steps == 1


# --------------------------------------------------------------------------- under torchrun


@pytest.mark.distributed
def test_ranks_agree_on_an_fp16_overflow_that_only_one_tower_saw(tmp_path, monkeypatch):
    # A NaN gradient in tower b alone (rank 1): its scaler finds an inf, tower a's would not.
    # Agreed, both ranks skip the step and halve their scale, as one process does with
    # the same NaN in its own tower a; not agreed, tower a would step and keep its scale.
    monkeypatch.setenv("ALEXNET2GPU_FAULT", "nan-grad:rank0:step2")
    towers = train(TrainConfig(**TINY, steps=3, precision="fp16", checkpoint_dir=str(tmp_path / "t")))
    monkeypatch.delenv("ALEXNET2GPU_FAULT")
    assert towers.overflow_steps >= 1
    ranks = run_torchrun(
        2,
        [*TINY_FLAGS, "--steps", "3", "--precision", "fp16", "--checkpoint-dir", str(tmp_path / "r")],
        env=torchrun_env(ALEXNET2GPU_FAULT="nan-grad:rank1:step2"),
    )
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    want = load_checkpoint(tmp_path / "t" / "step-00000003.pt")
    got = load_checkpoint(tmp_path / "r" / "step-00000003.pt")
    assert got["scaler"] == want["scaler"]
    _assert_weights_close(got["model"], want["model"], tol=1e-3)
