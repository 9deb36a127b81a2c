"""The training curves a reader takes in at once: loss on its own labelled axis from 0,
accuracies on theirs within 0 to 1 (a zoomed range said in the label), train, validation
and test told apart in a legend, every point inside the axes (a single evaluation drawn
as a marker), the latest values written, and a title naming net, image size, recipe,
schedule and stage. Built from handmade curves, checked on the figure objects."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from alexnet2gpu.report.curves import (  # noqa: E402
    LOSS_LABEL,
    RunLabel,
    build_curves_figure,
    write_curves,
)

LABEL = RunLabel("dual", 72, "d2l", "cosine", 2, "/ck/step-00002814.pt", "fashion-mnist")


def _curve(n: int, *, val: bool = True, start: float = 0.78) -> list[dict]:
    points = []
    for i in range(1, n + 1):
        point = {
            "epoch": float(i),
            "train_loss": 0.9 / i,
            "train_accuracy": min(0.99, start + 0.01 * i),
            "test_accuracy": min(0.99, start + 0.012 * i),
        }
        if val:
            point["val_accuracy"] = min(0.99, start + 0.011 * i)
        points.append(point)
    return points


def _axes(curve, title=LABEL):
    figure = build_curves_figure(curve, title)
    loss, accuracy = figure.axes
    return figure, loss, accuracy


def _legend(axes) -> list[str]:
    return [t.get_text() for t in axes.get_legend().get_texts()]


@pytest.mark.parametrize("n", [1, 2, 10])
def test_two_labelled_axes_loss_from_zero_accuracy_within_unit(n):
    figure, loss, accuracy = _axes(_curve(n))
    assert len(figure.axes) == 2
    assert loss.get_ylabel() == LOSS_LABEL
    assert loss.get_ylim()[0] == 0.0
    assert loss.get_ylim()[1] > max(p["train_loss"] for p in _curve(n))  # the first point not on the top edge
    low, high = accuracy.get_ylim()
    assert 0.0 <= low < high <= 1.0
    assert "accuracy" in accuracy.get_ylabel()
    for axes in (loss, accuracy):
        assert axes.get_xlabel() == "epoch"


@pytest.mark.parametrize("n", [1, 2, 10])
def test_points_are_inside_the_x_axis_and_drawn_as_markers(n):
    _, loss, accuracy = _axes(_curve(n))
    for axes in (loss, accuracy):
        left, right = axes.get_xlim()
        assert left < 1.0 and right > float(n)  # strictly wider: no point on an edge
        for line in axes.get_lines():
            assert line.get_marker() not in (None, "", "None")  # one point still shows
            assert len(line.get_xdata()) == n


def test_train_validation_and_test_are_distinct_and_in_the_legend():
    _, _, accuracy = _axes(_curve(3))
    labels = _legend(accuracy)
    for who in ("train", "validation", "test"):
        assert any(label.startswith(who) for label in labels), (who, labels)
    lines = accuracy.get_lines()
    assert len(lines) == 3
    assert len({(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines}) == 3
    assert len({line.get_color() for line in lines}) == 3


@pytest.mark.parametrize("val", [None, "absent"])
def test_a_run_without_validation_draws_train_and_test_only(val):
    curve = _curve(2, val=False)
    if val is None:
        for point in curve:
            point["val_accuracy"] = None
    _, _, accuracy = _axes(curve)
    labels = _legend(accuracy)
    assert not any(label.startswith("validation") for label in labels)
    assert any(label.startswith("train") for label in labels) and "test" in labels


def test_accuracy_axis_zooms_only_when_every_value_is_high_and_says_so():
    _, _, high = _axes(_curve(3, start=0.78))
    assert high.get_ylim() == (0.5, 1.0)
    assert "0.5" in high.get_ylabel()
    _, _, low = _axes(_curve(3, start=0.1))
    assert low.get_ylim() == (0.0, 1.0)
    assert low.get_ylabel() == "accuracy"


def test_the_latest_values_are_written_at_the_line_ends():
    curve = _curve(4)
    _, loss, accuracy = _axes(curve)
    last = curve[-1]
    assert [t.get_text() for t in loss.texts] == [f"{last['train_loss']:.3f}"]
    written = {t.get_text() for t in accuracy.texts}
    assert written == {f"{last[k]:.3f}" for k in ("train_accuracy", "val_accuracy", "test_accuracy")}
    # close values are pushed apart, not printed over each other
    heights = sorted(t.xyann[1] for t in accuracy.texts)
    span = accuracy.get_ylim()[1] - accuracy.get_ylim()[0]
    assert all(b - a >= 0.05 * span for a, b in zip(heights, heights[1:]))


def test_title_names_model_image_size_recipe_schedule_and_stage():
    figure, _, _ = _axes(_curve(1))
    title = figure.get_suptitle()
    for part in ("dual", "72 px", "d2l recipe", "cosine schedule", "stage 2", "step-00002814.pt"):
        assert part in title, (part, title)
    assert RunLabel("simplified", 112, "paper", "plateau", 1).title().endswith("stage 1 (from scratch)")
    assert "stage" not in RunLabel("simplified").title()


def test_a_plain_string_title_still_works():
    figure, _, _ = _axes(_curve(2), title="simplified, recipe d2l, fashion-mnist")
    assert figure.get_suptitle() == "simplified, recipe d2l, fashion-mnist"


def test_epochs_of_a_later_stage_are_drawn_as_given():
    curve = _curve(3)
    for point in curve:
        point["epoch"] += 6
    _, loss, _ = _axes(curve)
    left, right = loss.get_xlim()
    assert 6.0 < left < 7.0 and right > 9.0
    assert list(loss.get_lines()[0].get_xdata()) == [7.0, 8.0, 9.0]


def test_write_curves_replaces_the_png_and_returns_the_figure(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")
    figure = write_curves(path, _curve(1), LABEL)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure.axes) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left
