"""fit: sizes parsed and refused, the cards' capacities, the line through two planned
steps against direct estimates at other batch sizes (tiny nets, real and fake tensors), the
largest batch on the boundary, the command's outputs, and its parsing without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexnet2gpu import ConfigError, build_model, place
from alexnet2gpu.cli import main
from alexnet2gpu.measure.cards import CARDS, Card, parse_size
from alexnet2gpu.measure.estimate import estimate_memory, plan_memory
from alexnet2gpu.measure.fit import (
    Reserve,
    check_boundary,
    configurations,
    default_reserve,
    plan_fit,
    solve,
    step_line,
    tracked_peak,
)
from alexnet2gpu.parallel import Layout, Numerics

from .test_cli_fast import _PARSE_ONLY, HEAVY
from .tiny import TINY, TINY_ARGS, tiny

GiB = 2**30
NO_RESERVE = Reserve(0, 0, 0, "none (test)")


@pytest.mark.parametrize(
    "text,size",
    [("3GiB", 3 * GiB), ("16GB", 16 * 10**9), ("500MiB", 500 * 2**20), ("1.5 gib", 3 * GiB // 2), ("2048B", 2048)],
)
def test_sizes_are_parsed_with_decimal_gb_and_binary_gib(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["3", "3 gigs", "GiB", "-1GB", "0GB", "3GiBs", ""])
def test_bad_sizes_are_refused_with_what_would_work(text):
    with pytest.raises(ConfigError, match="e.g. 3GiB"):
        parse_size(text)


def test_the_cards_the_issue_names_hold_their_datasheet_gigabytes_as_gib():
    want = {"gtx580-3gb": 3, "v100-16gb": 16, "v100-32gb": 32, "a100-40gb": 40, "a100-80gb": 80}
    want |= {"h100-80gb": 80, "h200-141gb": 141}
    assert {name: card.capacity_bytes / GiB for name, card in CARDS.items()} == want
    assert all(card.source and card.stated for card in CARDS.values())


def test_configurations_pair_dual_with_its_placements_and_the_others_with_single():
    every = configurations()
    assert len(every) == (4 + 3) * 3
    assert ("dual", "single", "fp32") not in every and ("simplified", "towers", "fp32") not in every
    assert configurations(["half"], None, ["bf16"]) == [("half", "single", "bf16")]
    with pytest.raises(ConfigError, match="no placement in single applies to dual"):
        configurations(["dual"], ["single"])
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        configurations(None, None, ["fp8"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model,placement", [("dual", "towers"), ("dual", "split"), ("dual", "grouped")])
def test_the_line_matches_direct_estimates_at_other_batch_sizes(model, placement, precision):
    """The line drawn through the plans at batch 2 and 4 gives every category at batch 3,
    7 and 13 as a direct plan does, and as the estimator does on a real step at batch 5."""
    line = step_line(model, placement, precision, **tiny(model))
    layout = Layout("split", (torch.device("cpu"),) * 2) if placement == "split" else Layout(placement, ("cpu",))
    for batch in (3, 7, 13):
        direct = plan_memory(model, layout, batch, numerics=Numerics(precision), **tiny(model))
        for slot, d in enumerate(direct.devices):
            assert line.breakdown(slot, batch) == {
                c: getattr(d, f"{c}_bytes")
                for c in ("params", "grads", "optimizer", "activations", "input", "weight_casts")
            }
            assert line.peak(slot, batch) == d.peak_bytes
    placed = place(build_model(model, **tiny(model)), placement, "cpu,cpu" if placement == "split" else "cpu")
    real = estimate_memory(placed, model, 5, numerics=Numerics(precision), width=TINY["width"])
    assert [line.peak(s, 5) for s in range(len(real.devices))] == [d.peak_bytes for d in real.devices]


def test_single_stream_nets_have_a_line_too():
    line = step_line("simplified", "single", "fp16", **tiny("simplified"))
    direct = plan_memory("simplified", Layout("single", ("cpu",)), 9, numerics=Numerics("fp16"), **tiny("simplified"))
    assert line.peak(0, 9) == direct.devices[0].peak_bytes and line.devices == ["cuda:0"]


def _card_for(line, batch: float) -> Card:
    capacity = round(
        max(line.peak(s, 0) + (line.peak(s, 1) - line.peak(s, 0)) * batch for s in range(len(line.devices)))
    )
    return Card("test", "test", capacity, "", "test")


@pytest.mark.parametrize("placement", ["towers", "split", "ranks"])
def test_the_largest_batch_lands_on_the_boundary(placement):
    line = step_line("dual", placement, "bf16", **TINY)
    row = solve(line, _card_for(line, 10.5), NO_RESERVE)
    assert row.largest_batch == 10
    check = check_boundary(row, NO_RESERVE, **TINY)
    assert check["on_boundary"] and check["fits_at_batch"] and check["exceeds_above"]
    if placement != "towers":  # tower a and fc8 hold more than tower b: the first device binds
        assert row.binding_device == ("rank 0" if placement == "ranks" else "cuda:0")
        assert row.devices[0]["largest_batch_alone"] <= row.devices[1]["largest_batch_alone"]


def test_the_reserve_comes_off_every_device_and_the_breakdown_adds_up():
    line = step_line("dual", "split", "fp32", **TINY)
    reserve = Reserve(2**20, 2**20, 0, "test")
    row = solve(line, _card_for(line, 20.2), reserve)
    assert row.largest_batch < 20
    for d in row.devices:
        assert d["breakdown"]["reserve"] == 2**20 and sum(d["breakdown"].values()) == d["total_bytes"]
        assert d["total_bytes"] <= row.capacity_bytes
    assert "assumption" in default_reserve().source


def test_a_card_too_small_for_the_weights_fits_no_batch():
    line = step_line("dual", "towers", "fp32", **TINY)
    row = solve(line, Card("tiny", "tiny", 1000, "", "test"), NO_RESERVE)
    assert row.largest_batch == 0


@pytest.mark.full_size
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dual_towers_on_a_3gb_card_lands_on_the_boundary(precision):
    """Issue 16's target: the predicted largest batch for dual/towers on the GTX 580 3 GB,
    checked by estimating the step (directly, not from the line) at that batch and one above."""
    plan = plan_fit([CARDS["gtx580-3gb"]], ["dual"], ["towers"], [precision])
    (row,) = plan.rows
    check = check_boundary(row, plan.reserve)
    assert row.largest_batch > 0 and check["on_boundary"], check


def test_fit_command_writes_json_markdown_and_png(tmp_path, capsys):
    out = {ext: tmp_path / f"fit.{ext}" for ext in ("json", "md", "png")}
    argv = ["fit", "--memory", "6MiB", "--reserve", "1MiB", "--model", "dual", "--placement", "towers,split"]
    argv += ["--precision", "fp32,bf16", *TINY_ARGS, "--check-boundary", "--threads", "1"]
    argv += [f"--{ext}={path}" for ext, path in out.items()]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dual/split bf16" in printed and "given (--reserve)" in printed and "binds" in printed
    data = json.loads(out["json"].read_text())
    assert len(data["rows"]) == 4 and data["reserve"]["bytes"] == 2**20
    for row in data["rows"]:
        assert row["check"]["on_boundary"] and row["largest_batch"] >= 1
        assert set(row["devices"][0]["breakdown"]) == {
            "params", "grads", "optimizer", "activations", "input", "weight_casts", "reserve"
        }  # fmt: skip
    assert "| dual/towers fp32 |" in out["md"].read_text()
    assert out["png"].read_bytes()[:4] == b"\x89PNG"


def test_check_without_cuda_is_refused_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["fit", "--card", "gtx580-3gb", "--check"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--check" in err and "CUDA" in err


def test_fit_help_and_refused_flags_import_no_torch():
    bad = [
        ["fit", "--memory", "3gigs"],
        ["fit", "--card", "gtx58"],
        ["fit", "--model", "vgg"],
        ["fit", "--precision", "fp8"],
        ["fit", "--memory", "3GiB", "--card", "h200-141gb"],
        ["fit", "--no-such-flag"],
    ]
    result = subprocess.run(
        [sys.executable, "-c", _PARSE_ONLY, json.dumps([*bad, ["fit", "--help"]]), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["heavy"] == []
    for argv, code, err in report["results"]:
        if argv == ["fit", "--help"]:
            assert code == 0 and err == ""
        else:
            assert code == 2 and err.count("\n") == 1 and err.endswith(" (see alexnet2gpu fit --help)\n"), (argv, err)
    assert "did you mean 'gtx580-3gb'" in report["results"][1][2]


def test_memtracker_s_peak_with_temporaries_is_near_the_estimate_for_a_tiny_net():
    line = step_line("dual", "towers", "fp32", **TINY)
    tracked = tracked_peak("dual", "towers", "fp32", 8, **TINY)
    assert 0.5 * line.peak(0, 8) < tracked < 1.5 * line.peak(0, 8)
    row = solve(line, _card_for(line, 8.5), NO_RESERVE)
    check = check_boundary(row, NO_RESERVE, **TINY)
    assert check["tracked_peak_bytes"] == tracked and "tracked_fits_with_context" in check


def test_the_readme_fit_table_is_its_record():
    """The table the README shows is the one docs/runs/fit-all-cards.json holds, cell by cell."""
    root = Path(__file__).resolve().parent.parent
    record = json.loads((root / "docs" / "runs" / "fit-all-cards.json").read_text())
    section = (root / "README.md").read_text().split("## What fits where: `alexnet2gpu fit`", 1)[1]
    shown = {
        cells[0]: cells[1:]
        for line in section.split("## ", 1)[0].splitlines()
        if line.startswith("│") and (cells := [c.strip() for c in line.strip("│").split("│")])
    }
    cards = [card["name"] for card in record["cards"]]
    assert len(shown) == len(record["rows"]) // len(cards) == 21
    for row in record["rows"]:
        cell = shown[f"{row['model']}/{row['placement']} {row['precision']}"][cards.index(row["card"])]
        two = len(row["devices"]) > 1
        assert cell == f"{row['largest_batch']:,}" + (f" ({row['binding_device']})" if two else ""), row["card"]
    assert f"reserve {record['reserve']['bytes'] / 2**20:.1f} MiB per device" in section


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_with_temporaries_the_peak_over_time_must_fit_too(precision):
    """MemTracker's line (through batch 64 and 128) gives its peak at other batches within
    2 % on the tiny net (exactly linear at full size: docs/runs/fit-memtracker-towers.log),
    and a card must hold it too."""
    plain = step_line("dual", "towers", precision, **TINY)
    line = step_line("dual", "towers", precision, temporaries=True, **TINY)
    assert line.tracked is not None and plain.tracked is None
    for batch in (200,):  # beyond the line's two points (suite time: one direct peak)
        direct = tracked_peak("dual", "towers", precision, batch, **TINY)
        assert abs(line.tracked_peak(batch) - direct) <= 0.02 * direct
    card = _card_for(plain, 150.5)
    row, plain_row = solve(line, card, NO_RESERVE), solve(plain, card, NO_RESERVE)
    assert row.largest_batch <= plain_row.largest_batch == 150
    assert "temporaries" in row.devices[0]["breakdown"] and "temporaries" not in plain_row.devices[0]["breakdown"]
    check = check_boundary(row, NO_RESERVE, **TINY)
    assert set(check["tracked_totals_bytes"]) == {str(row.largest_batch), str(row.largest_batch + 1)}
    assert check["fits_at_batch"] == (
        check["tracked_fits_at_batch"] and max(check["totals_bytes"][str(row.largest_batch)]) <= card.capacity_bytes
    )


def test_towers_apart_are_not_tracked():
    assert step_line("dual", "split", "bf16", temporaries=True, **TINY).tracked is None
