"""verify --precision bf16|fp16: every placement within tolerances derived from the dtype's
unit roundoff against the float64 reference, the placements within a tighter one of each
other, float32 unchanged at 1e-5, and a broken placement caught."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alexnet2gpu.checks import verify as verify_mod
from alexnet2gpu.checks.verify import TOLERANCE, UNIT_ROUNDOFF, check_all, check_placement, tolerances
from alexnet2gpu.cli import main
from alexnet2gpu.parallel import Numerics

PLACEMENTS = [("towers", ["cpu"]), ("grouped", ["cpu"]), ("split", ["cpu", "cpu"])]


def test_tolerances_come_from_the_unit_roundoff():
    assert tolerances("fp32") == verify_mod.Tolerances(TOLERANCE, TOLERANCE, TOLERANCE) and TOLERANCE == 1e-5
    assert UNIT_ROUNDOFF == {"bf16": 2**-8, "fp16": 2**-11}
    for precision, u in UNIT_ROUNDOFF.items():
        limits = tolerances(precision)
        assert limits.forward == limits.agree == 2 * 8 * u  # 2 roundings x 8 products on the path
        assert limits.grads == pytest.approx(2 * 8 * u + math.sqrt(10 * u))  # + 10 ReLU/pool layers of flips
    assert tolerances("fp16").grads < tolerances("bf16").grads


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_placement_passes_in_low_precision_and_they_agree(precision):
    checks, agreements = check_all(PLACEMENTS, batch_size=4, seed=1, numerics=Numerics(precision))
    limits = tolerances(precision)
    assert [c.placement for c in checks] == ["towers", "grouped", "split"]
    for c in checks:
        assert c.ok, c
        assert c.precision == precision and c.grads_norm == "global" and c.grads_tolerance == limits.grads
        # not vacuous: the low precision really ran (float32 would be ~1e-7)
        assert c.logits_rel_err > UNIT_ROUNDOFF[precision] / 4
    assert [(a.placement, a.against) for a in agreements] == [("grouped", "towers"), ("split", "towers")]
    for a in agreements:
        assert a.ok and a.same_forward, a  # one device kind: the same forward arithmetic
    split = agreements[1]
    assert split.grads_rel_err == 0.0  # split on cpu,cpu runs towers' very kernels


def test_float32_keeps_its_tolerance_and_per_tensor_gradients():
    check = check_placement("grouped", "cpu", batch_size=4, seed=1)
    assert check.ok and check.tolerance == TOLERANCE and check.grads_tolerance is None
    assert check.grads_norm == "max" and check.precision == "fp32"
    _, agreements = check_all(PLACEMENTS[:2], batch_size=4, seed=1)
    assert agreements == []  # float32 is held to float64 alone, as before


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_broken_placement_fails_in_low_precision(precision, monkeypatch):
    """split with tower b's conv3 weights negated (a placement that computes another
    function) fails against float64 and against towers."""
    real = verify_mod.place

    def broken(model, placement, devices):
        placed = real(model, placement, devices)
        if placement == "split":
            with torch.no_grad():
                placed.tower_b.conv3.weight.neg_()
        return placed

    monkeypatch.setattr(verify_mod, "place", broken)
    checks, agreements = check_all(PLACEMENTS, batch_size=4, seed=1, numerics=Numerics(precision))
    assert [c.ok for c in checks] == [True, True, False]
    assert [a.ok for a in agreements] == [True, False]
    assert not agreements[1].same_forward


def test_verify_bf16_on_the_command_line_writes_its_numerics(tmp_path, capsys):
    out = tmp_path / "verify.json"
    assert main(["verify", "--precision", "bf16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["numerics"]["precision"] == "bf16" and "tf32_matmul" in data["numerics"]
    assert data["tolerances"]["grads"] == tolerances("bf16").grads
    assert {c["placement"] for c in data["checks"]} == {"towers", "grouped", "split"}
    assert all(c["ok"] and c["precision"] == "bf16" for c in data["checks"])
    assert len(data["agreements"]) == 2 and all(a["ok"] for a in data["agreements"])
    printed = capsys.readouterr().out
    assert "split against towers (bf16)" in printed and "MISMATCH" not in printed


def test_verify_fp32_json_is_as_before_plus_its_numerics(tmp_path):
    out = tmp_path / "verify.json"
    assert main(["verify", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tolerance"] == TOLERANCE and data["numerics"]["precision"] == "fp32" and data["agreements"] == []


def test_results_md_s_bf16_verify_figures_are_the_record():
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    data = json.loads((docs / "runs" / "bf16-cpu-verify.json").read_text())
    assert data["numerics"]["precision"] == "bf16" and all(c["ok"] for c in data["checks"])
    figures = {
        (f"{c['logits_rel_err']:.2e}", f"{c['loss_rel_err']:.1e}", f"{c['grads_rel_err']:.2e}") for c in data["checks"]
    }
    assert len(figures) == 1  # the three placements: one set of figures
    logits, loss, grads = figures.pop()
    row = f"| bf16 | towers, grouped, split (cpu,cpu) | {logits} | {loss} | {grads} | 0.0625 / 0.26 |"
    assert row in (docs / "results.md").read_text()
    assert f"{data['agreements'][0]['grads_rel_err']:.1e} (bf16)" in (docs / "results.md").read_text()
