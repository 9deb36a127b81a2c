"""`verify --processes`: verify launches CPU processes itself (elastic_launch, gloo) and
checks ranks, replicas and hybrid there against the single-process float64 reference; a
rank that computes another gradient fails the check, a rank that raises comes back as one
line naming it, and the rows print in verify's table and JSON. The launches are
``distributed`` (so ``integration``) tests: each one starts processes that import torch."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest

from alexnet2gpu.checks import verify_launch
from alexnet2gpu.checks.verify import tolerances
from alexnet2gpu.checks.verify_launch import launch_checks, process_checks
from alexnet2gpu.checks.verify_processes import ProcessCheck
from alexnet2gpu.cli import main


def test_which_checks_run_on_how_many_processes():
    assert process_checks(2) == [
        ("ranks", "dual"),
        ("replicas", "dual"),
        ("replicas", "half"),
        ("replicas", "torchvision"),
        ("replicas", "simplified"),
        ("hybrid", "half"),
        ("hybrid", "torchvision"),
        ("hybrid", "simplified"),
    ]
    assert process_checks(4) == process_checks(2)  # ranks on 4: 2 replicas x 2 towers
    assert ("ranks", "dual") not in process_checks(3)  # ranks needs an even count


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "--processes", "1"], "--processes 1: a count must be at least 2, got 1"),
        (["verify", "--processes", "two"], "--processes takes process counts such as 2 or 2,4, got 'two'"),
        (
            ["verify", "--processes", "2,4", "--batch-size", "6"],
            "--batch-size 6 over 4 processes: a global batch of 6 does not divide over 4",
        ),
        (["verify", "--processes", "2", "--process-timeout", "0"], "--process-timeout must be positive, got 0"),
    ],
)
def test_bad_process_flags_are_one_line_before_any_launch(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(verify_launch, "launch_checks", None)  # any launch would raise
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def _record(**changes) -> ProcessCheck:
    base = dict(
        placement="replicas",
        model="simplified",
        processes=2,
        batch_size=4,
        dropout=0.0,
        loss=2.3,
        loss_rel_err=1e-8,
        grads_rel_err=1e-7,
        worst_grad="conv1.weight",
        sent_bytes=[100.0, 100.0],
        closed_form_bytes=100.0,
    )
    return ProcessCheck(**{**base, **changes})


def test_a_process_check_needs_the_tolerances_and_the_closed_form_bytes():
    assert _record().ok
    assert not _record(grads_rel_err=2e-5).ok
    assert not _record(sent_bytes=[100.0, 96.0]).ok  # one rank sent other bytes
    bf16 = tolerances("bf16")
    low = _record(grads_rel_err=0.1, tolerance=bf16.forward, grads_tolerance=bf16.grads, precision="bf16")
    assert low.ok and not _record(grads_rel_err=0.1).ok
    assert ProcessCheck.from_json(low.to_json()) == low


def _failure(message, exitcode: int, timestamp: int):
    return SimpleNamespace(message=message, exitcode=exitcode, timestamp=timestamp, signal_name=lambda: "SIGTERM")


def test_the_root_cause_is_the_rank_with_an_error_of_its_own():
    """The agent stops the other ranks: their failures (a signal, or a collective that
    failed because of the first: PeerStopped) are not the cause."""
    from alexnet2gpu.parallel.processes import root_cause

    own = {"message": "ValueError: shape mismatch\nmore", "extraInfo": {}}
    echo = {"message": "PeerStopped: rank 0: a collective failed (a peer stopped?): Connection closed by peer"}
    error = SimpleNamespace(failures={0: _failure(echo, 1, 1), 1: _failure(own, 1, 2), 2: _failure("", -15, 0)})
    failed = root_cause(error)
    assert failed.rank == 1 and failed.exception.startswith("ValueError: shape mismatch")
    only_killed = root_cause(SimpleNamespace(failures={1: _failure("", -9, 0)}))
    assert (only_killed.rank, only_killed.exception) == (1, "killed by signal SIGTERM (exit code -9)")


@pytest.mark.distributed
def test_verify_prints_the_process_rows_and_they_pass(capsys, tmp_path):
    out = tmp_path / "verify.json"
    assert main(["verify", "--processes", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "processes" in table and "cpu (gloo)" in table
    for word in ("ranks", "replicas", "hybrid", "torchvision", "half", "simplified"):
        assert word in table
    data = json.loads(out.read_text())
    assert data["processes"] == [2] and data["process_failures"] == []
    rows = data["process_checks"]
    assert [(r["placement"], r["model"]) for r in rows] == process_checks(2)
    for r in rows:
        assert r["ok"] and r["processes"] == 2 and r["grads_rel_err"] < 1e-5, r
        assert r["sent_bytes"] == [r["closed_form_bytes"]] * 2 and r["closed_form_bytes"] > 0
    assert [c["placement"] for c in data["checks"]] == ["towers", "grouped", "split"]  # the one-process rows stay


@pytest.mark.distributed
def test_a_rank_that_computes_another_gradient_fails(capsys, monkeypatch):
    """Rank 1 doubles its first gradient after the backward (in the child process): every
    row fails, and says it was rank 1 (ranks gathers tower b's gradient on both ranks)."""
    perturbed = functools.partial(launch_checks, perturb_rank=1)
    monkeypatch.setattr(verify_launch, "launch_checks", perturbed)
    rows = [("ranks", "dual"), ("replicas", "simplified"), ("hybrid", "torchvision")]
    monkeypatch.setattr(verify_launch, "process_checks", lambda processes: rows)
    assert main(["verify", "--processes", "2", "--json", "-"]) == 1
    data = json.loads(capsys.readouterr().out.split("alexnet2gpu verify: MISMATCH")[0])
    got = data["process_checks"]
    assert [(r["placement"], r["model"]) for r in got] == rows
    for r in got:
        assert not r["ok"] and r["grads_rel_err"] > 0.5, r
    assert [r["worst_rank"] for r in got[1:]] == [1, 1]
    assert got[0]["worst_grad"].startswith("tower_b.")  # rank 1 holds tower b


@pytest.mark.distributed
def test_a_rank_that_raises_comes_back_as_one_line(capsys, monkeypatch):
    monkeypatch.setattr(verify_launch, "process_checks", lambda processes: [("replicas", "nosuch")])
    assert main(["verify", "--processes", "2"]) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    failed = [line for line in text.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1, text
    assert "2 processes: rank " in failed[0] and "failed: ConfigError: unknown model 'nosuch'" in failed[0]
    assert "Traceback" not in text


@pytest.mark.distributed
def test_bf16_process_rows_use_the_derived_tolerances():
    """Under autocast the activations cross in bfloat16 (2 bytes: the closed form halves
    them) and the gradients are held to the tolerance derived from bfloat16's roundoff."""
    records, failure = launch_checks(2, [("ranks", "dual", 4), ("hybrid", "simplified", 4)], precision="bf16")
    assert failure is None
    limits = tolerances("bf16")
    for r in records:
        assert r.ok and r.precision == "bf16" and r.grads_norm == "global", r
        assert r.tolerance == limits.forward and r.grads_tolerance == limits.grads
        assert r.grads_rel_err > 1e-4  # not vacuous: bfloat16 really ran
        assert r.sent_bytes == [r.closed_form_bytes] * 2
