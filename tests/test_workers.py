"""The two-workers comparison (issue 17, "Compared"): records come back as data through the
one launcher (``elastic_launch``), counted bytes equal the closed forms for every way at two
batch sizes, a failing rank comes back as one error naming it, and the table, Markdown and
plot render from records built by hand, with the crossing points solved exactly."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.distributed as dist

from alexnet2gpu import build_model
from alexnet2gpu.measure.workers import (
    MODELS,
    ProcessMemory,
    TrafficLine,
    WorkerRecord,
    crossing,
    measure_workers,
    traffic_lines,
    ways_for,
    workers_job,
)
from alexnet2gpu.models import smallest_image_size
from alexnet2gpu.parallel.processes import WorkersFailed, launch
from alexnet2gpu.parallel.traffic import closed_form_bytes
from alexnet2gpu.report.traffic import crossings, plot_bytes
from alexnet2gpu.report.workers import workers_markdown, workers_rows

TINY = {"width": 1 / 16, "image_size": max(smallest_image_size(n) for n in MODELS)}
SETTINGS = {"repeats": 1, "steps": 1, "warmup": 0, "seed": 0, "device": "cpu", **TINY}


def _fails_on_rank_1() -> int:
    """Launched by a test: rank 1 raises, rank 0 waits for it at a barrier."""
    if dist.get_rank() == 1:
        raise ZeroDivisionError("rank 1 divides by zero on purpose")
    dist.barrier()
    return 0


@pytest.fixture(scope="module")
def measured() -> dict[int, list[WorkerRecord]]:
    """The tiny nets at global batch 8 (through measure_workers) and 4 (the job itself)."""
    at8 = measure_workers(MODELS, batch_size=8, repeats=1, warmup=0, timeout_s=300, **TINY)
    at4 = launch(workers_job, MODELS, {**SETTINGS, "batch_size": 4}, processes=2, timeout_s=300)
    return {8: at8, 4: [WorkerRecord.from_json(r) for r in at4]}


@pytest.mark.distributed
def test_records_come_back_as_data(measured):
    records = measured[8]
    assert [(r.model, r.way) for r in records] == [(n, way) for n in MODELS for way, _ in ways_for(n)]
    for r in records:
        assert isinstance(r, WorkerRecord) and r.batch_size == 8 and r.threads == 1
        assert len(r.memory) == r.processes == (1 if r.way == "one device" else 2)
        assert all(m.source == "estimated" and m.peak_bytes > m.params_bytes > 0 for m in r.memory)
        assert r.images_per_s > 0 and len(r.rates) == 1
    by_way = {(r.model, r.way): r for r in records}
    # data parallel holds the whole net per process; the hybrid and each tower about half
    whole = by_way[("torchvision", "data parallel")].memory[0].params
    assert by_way[("torchvision", "one device")].memory[0].params == whole
    assert whole / 2 < by_way[("torchvision", "hybrid")].memory[0].params < whole * 0.6
    towers = by_way[("dual", "towers")].memory
    assert sum(m.params for m in towers) == by_way[("dual", "one device")].memory[0].params


@pytest.mark.distributed
@pytest.mark.parametrize("batch", [4, 8])
def test_counted_bytes_equal_the_closed_form(measured, batch):
    for r in measured[batch]:
        if r.way == "one device":
            assert r.sent_bytes == [0.0] and r.closed_form_bytes is None
            continue
        with torch.device("meta"):
            model = build_model(r.model, **TINY)
        assert r.closed_form_bytes == closed_form_bytes(r.placement, model, batch, 2) > 0
        assert r.sent_bytes == [r.closed_form_bytes] * 2, f"{r.model} {r.way} batch {batch}"
        assert r.bytes_match


@pytest.mark.distributed
def test_a_failing_rank_comes_back_as_one_error_naming_it():
    with pytest.raises(WorkersFailed) as caught:
        launch(_fails_on_rank_1, processes=2, timeout_s=120)
    error = caught.value
    assert error.rank == 1
    assert "ZeroDivisionError: rank 1 divides by zero on purpose" in error.exception
    assert str(error).startswith("worker rank 1 failed: ZeroDivisionError")


def test_crossings_are_where_the_closed_forms_are_equal():
    lines = {(line.model, line.way): line for line in traffic_lines()}
    hybrid, replicas = lines[("torchvision", "hybrid")], lines[("torchvision", "data parallel")]
    batch = crossing(hybrid, replicas)
    # (244,403,360 - 9,878,784) / 71,636: the trunk's all-reduce plus 71,636 B per image
    assert batch == Fraction(244_403_360 - 9_878_784, 71_636) and round(float(batch)) == 3274
    towers = crossing(lines[("dual", "towers")], lines[("dual", "data parallel")])
    assert towers == Fraction(243_860_896, 234_496) and int(towers) == 1039
    with torch.device("meta"):
        nets = {name: build_model(name) for name in MODELS}
    for cross in crossings(list(lines.values())):
        placements = dict(ways_for(cross.model))
        a, b = (lines[(cross.model, way)] for way in cross.ways)
        assert a.bytes_at(cross.batch) == b.bytes_at(cross.batch) == cross.bytes
        for way in cross.ways:  # the lines are the closed forms, at whole batches too
            for whole in (2 * (int(cross.batch) // 2), 4096):
                line = lines[(cross.model, way)]
                assert line.bytes_at(whole) == closed_form_bytes(placements[way], nets[cross.model], whole, 2)
    assert {(c.model, c.less_below) for c in crossings(list(lines.values()))} == {
        ("dual", "towers"),
        ("torchvision", "hybrid"),
        ("simplified", "hybrid"),
    }


def _hand_records() -> list[WorkerRecord]:
    def memory(rank, params):
        return ProcessMemory(
            rank, "estimated", params // 4, params, params, params, 3 * 2**20, 2**20, 3 * params + 4 * 2**20
        )

    common = {"batch_size": 128, "image_size": 227, "width": 1.0, "threads": 1, "device": "cpu"}
    return [
        WorkerRecord("dual", "one device", "towers", 1, memory=[memory(0, 2**28)], sent_bytes=[0.0], **common),
        WorkerRecord(
            "dual",
            "towers",
            "ranks",
            2,
            memory=[memory(0, 2**27), memory(1, 2**26)],
            sent_bytes=[30_015_488.0, 30_015_488.0],
            closed_form_bytes=30_015_488.0,
            images_per_s=20.5,
            spread_images_per_s=0.5,
            rates=[20.0, 21.0],
            **common,
        ),
        WorkerRecord(
            "torchvision",
            "hybrid",
            "hybrid",
            2,
            memory=[memory(0, 2**27)] * 2,
            sent_bytes=[19_048_192.0, 1.0],
            closed_form_bytes=19_048_192.0,
            **common,
        ),
    ]


def test_table_and_markdown_render_from_records():
    records = _hand_records()
    rows = workers_rows(records)
    assert rows[0][:3] == ["dual", "one device", "1"] and rows[0][9:12] == ["0", "0", "yes"]
    assert rows[1][3] == "128.0 / 64.0"  # params per process: rank 0 / rank 1
    assert rows[1][9:12] == ["28.6", "28.6", "yes"] and rows[1][12] == "20.5 ± 0.5"
    assert rows[2][11] == "NO"  # one process counted other than the closed form
    again = [WorkerRecord.from_json(r.to_json()) for r in records]
    assert workers_rows(again) == rows
    text = workers_markdown(records, traffic_lines(), {"command": "scripts/two_workers.py", "loadavg_before": "1.0"})
    assert "| dual | towers | 2 | 128.0 / 64.0 |" in text
    assert "torchvision: hybrid sends less than data parallel below a global batch of 3,273.8" in text
    assert "dual: towers sends less than data parallel below a global batch of 1,039.9" in text
    assert "`scripts/two_workers.py`" in text


def test_plot_renders_from_records(tmp_path):
    path = tmp_path / "bytes.png"
    plot_bytes(traffic_lines(), _hand_records(), path)
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_line_keeps_its_fractions_through_json():
    line = TrafficLine("torchvision", "hybrid", 2, Fraction(9_878_784), Fraction(143_272, 2))
    assert TrafficLine.from_json(line.to_json()) == line
