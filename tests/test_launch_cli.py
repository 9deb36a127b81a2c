"""`alexnet2gpu launch`: torchrun started from our own process, ending with one line.

Under plain torchrun a refusal is one line followed by about 35 lines of torchrun's
ChildFailedError report. Under `alexnet2gpu launch` the one line (the first rank's own
error, or which rank died of what signal) is the last thing printed, and the exit status is
that rank's. The unit tests build torchrun's failures from real error files; the
distributed ones run the real command."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from alexnet2gpu.cli import launch
from alexnet2gpu.errors import ConfigError

from .dist_launch import run_killing_group, torchrun_env

TINY_FLAGS = [
    "--data", "synthetic", "--steps", "2", "--width", "0.0625", "--image-size", "64",
    "--batch-size", "8", "--devices", "cpu",
]  # fmt: skip


def _actions():
    from torch.distributed.run import get_args_parser

    return get_args_parser()._option_string_actions


def test_split_argv_finds_the_command_after_torchrun_options():
    actions = _actions()
    argv = ["--nproc-per-node", "2", "--standalone", "--rdzv-conf=timeout=5", "--role", "train", "train", "--x", "1"]
    assert launch.split_argv(argv, actions) == (argv[:6], ["train", "--x", "1"])
    assert launch.split_argv(["--nproc_per_node", "2", "--", "bench"], actions) == (
        ["--nproc_per_node", "2"],
        ["bench"],
    )
    assert launch.split_argv(["--nproc-per-node", "2", "--help", "train"], actions) == (None, [])


@pytest.mark.parametrize("argv, words", [(["--bogus", "train"], "not a torchrun option"), (["-m", "train"], "leave")])
def test_split_argv_refuses_in_one_line(argv, words):
    with pytest.raises(ConfigError, match=words):
        launch.split_argv(argv, _actions())


class _Boom(Exception):
    pass


class Terminated(Exception):  # stands for cli.train.Terminated: SIGTERM from torchrun
    pass


def _failure(tmp_path, local_rank, exitcode, error=None, command="train", code=2):
    """A ProcessFailure as torchrun builds it, from the error file the worker wrote (if any)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    path = tmp_path / f"error-{local_rank}.json"
    if error is not None:
        os.environ["TORCHELASTIC_ERROR_FILE"] = str(path)
        try:
            launch.record_root_cause(command, error, code)
        finally:
            del os.environ["TORCHELASTIC_ERROR_FILE"]
    return ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file=str(path))


def test_the_error_file_holds_the_line_where_torchrun_reads_it(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    assert not launch.record_root_cause("train", _Boom("no such placement"), 2)  # plain torchrun: print it too
    monkeypatch.setenv(launch.LAUNCHED_ENV, "1")
    assert launch.record_root_cause("train", _Boom("no such placement"), 2)  # the launcher prints it
    data = json.loads((tmp_path / "error.json").read_text())
    assert data["message"]["message"] == "alexnet2gpu train: error: no such placement"
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    report = str(ChildFailedError("alexnet2gpu", {0: _failure(tmp_path, 0, 2, _Boom("no such placement"))}))
    assert "traceback : alexnet2gpu train: error: no such placement" in report  # plain torchrun's root cause
    assert not launch.record_root_cause("train", _Boom("x"), 2)  # not under torchrun: nothing written


def test_root_cause_is_a_ranks_own_error_before_a_silent_exit(tmp_path):
    failures = {1: _failure(tmp_path, 1, 2), 0: _failure(tmp_path, 0, 2, _Boom("refused"))}
    assert launch.root_cause(failures) == ("alexnet2gpu train: error: refused", 2)


def test_root_cause_is_a_killed_rank_not_the_rank_torchrun_then_stopped(tmp_path):
    killed = _failure(tmp_path, 1, -signal.SIGKILL)
    stopped = _failure(tmp_path, 0, 1, Terminated("rank 0: stopped by the launcher (SIGTERM)"), code=1)
    line, code = launch.root_cause({0: stopped, 1: killed})
    assert (line, code) == ("alexnet2gpu launch: rank 1 (local rank 1) ended by SIGKILL", 128 + signal.SIGKILL)
    # a rank that torchrun stopped with SIGTERM comes after one that exited by itself
    line, code = launch.root_cause({0: _failure(tmp_path, 0, -signal.SIGTERM), 1: _failure(tmp_path, 1, 3)})
    assert line.startswith("alexnet2gpu launch: rank 1 (local rank 1) exited with status 3") and code == 3


def test_an_aborted_rank_is_named_with_what_nccl_s_watchdog_does(tmp_path):
    # gloo raises inside the collective; NCCL's watchdog aborts the process (SIGABRT) instead
    line, code = launch.root_cause({0: _failure(tmp_path, 0, -signal.SIGABRT)})
    assert line.startswith(
        "alexnet2gpu launch: rank 0 (local rank 0) ended by SIGABRT: on GPUs, usually NCCL's watchdog"
    )
    assert "--timeout" in line and code == 128 + signal.SIGABRT


def _launch(args: list[str], env: dict[str, str], timeout: float = 150) -> tuple[int, list[str]]:
    """``python -m alexnet2gpu launch ARGS``: (exit status, the non-empty lines of stdout and
    stderr together, in order). The whole process group dies if it outlives ``timeout``."""
    result = run_killing_group(
        [sys.executable, "-m", "alexnet2gpu", "launch", *args], timeout=timeout, env=env, merge_stderr=True
    )
    return result.returncode, [line for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.distributed
def test_a_refusal_under_launch_is_the_last_and_only_line():
    code, lines = _launch(
        ["--nproc-per-node", "2", "train", "--model", "simplified", "--placement", "ranks", *TINY_FLAGS],
        torchrun_env(),
    )
    assert code == 2, lines
    assert lines[-1].startswith("alexnet2gpu train: error: placement 'ranks' splits the two-tower net"), lines
    assert len(lines) == 1, lines  # no torchrun report, no second copy from the other rank


@pytest.mark.distributed
def test_a_killed_rank_under_launch_ends_with_one_line_naming_it():
    code, lines = _launch(
        ["--nproc-per-node", "2", "train", "--placement", "ranks", *TINY_FLAGS, "--steps", "4", "--timeout", "10"],
        torchrun_env(ALEXNET2GPU_FAULT="kill:rank1:step2"),  # test-only: rank 1 SIGKILLs itself in step 2
    )
    assert code == 128 + signal.SIGKILL, lines
    assert lines[-1] == "alexnet2gpu launch: rank 1 (local rank 1) ended by SIGKILL", lines
    assert len(lines) < 8, lines  # the run's header lines at most, and no report
