"""compare's plots say only what they draw: the dashed-line note only beside a dashed line,
the repeats behind the error bars stated (none drawn from a single repeat), every bar's
numbers on it, estimated bars hatched apart from measured ones, and dual/ranks' measured
process RSS a marker of its own beside its estimate. Built from small handmade records,
rendered with Agg, checked on the figure objects rather than pixels."""

from __future__ import annotations

import pytest

from alexnet2gpu.measure.accounting import DeviceMemory, MemoryReport
from alexnet2gpu.measure.bench import BenchResult
from alexnet2gpu.measure.matrix import CompareReport, Variant
from alexnet2gpu.report import fmt_mib, plots

MiB = 2**20


def _device(device: str, source: str, mib: tuple[int, ...], *, peak: int | None = None, rss: int | None = None):
    params, grads, optimizer, activations, inputs = (m * MiB for m in mib)
    return DeviceMemory(
        device=device,
        source=source,
        params=params // 4,
        params_bytes=params,
        grads_bytes=grads,
        optimizer_bytes=optimizer,
        activations_bytes=activations,
        peak_bytes=(peak * MiB) if peak else sum(m * MiB for m in mib),
        input_bytes=inputs,
        rss_peak_bytes=rss * MiB if rss else None,
    )


def _results(name: str, repeats: int, device: str = "cpu", compiled: bool = False) -> list[BenchResult]:
    rows = []
    for mode in ("train", "infer"):
        for batch in (8, 16):
            rates = [10.0 + batch + i for i in range(repeats)]
            rows.append(
                BenchResult(
                    model=name,
                    placement="single",
                    mode=mode,
                    batch_size=batch,
                    images_per_s=sorted(rates)[len(rates) // 2],
                    spread=(max(rates) - min(rates)) / 2,
                    device=device,
                    repeats_images_per_s=rates,
                    compiled=compiled,
                )
            )
    return rows


def _variant(name: str, devices: list[DeviceMemory] | None, results: list[BenchResult], **kw) -> Variant:
    memory = MemoryReport("dual", "towers", 16, devices, 0) if devices else None
    return Variant(name, "dual", "towers", "cpu", 1, memory, results, 0, **kw)


def _report(variants: list[Variant], repeats: int = 3) -> CompareReport:
    config = {"repeats": repeats, "threads": 1, "memory_batch_size": 16}
    return CompareReport(variants, {}, config, {}, None, 1.0, "test", torch="2.x")


def _figure(monkeypatch, plot, report, tmp_path):
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    return fig


def _memory_report() -> CompareReport:
    return _report(
        [
            _variant("simplified", [_device("cpu", "estimated", (100, 100, 100, 200, 10))], _results("s", 3)),
            _variant("gpu", [_device("cuda:0", "measured", (50, 50, 50, 80, 5), peak=260)], []),
            _variant(
                "dual/ranks",
                [
                    _device("cpu (rank 0)", "estimated", (60, 60, 60, 120, 5), rss=700),
                    _device("cpu (rank 1)", "estimated", (55, 55, 55, 110, 0), rss=650),
                ],
                _results("r", 3, "cpu x2 processes"),
            ),
        ]
    )


def test_memory_bars_carry_their_numbers(monkeypatch, tmp_path):
    report = _memory_report()
    (ax,) = _figure(monkeypatch, plots.plot_memory, report, tmp_path).axes
    texts = [t.get_text() for t in ax.texts]
    for v in report.variants:
        for d in v.memory.devices:
            assert fmt_mib(d.peak_bytes) in texts  # the peak on top of every bar, as in the table
            for key in ("params_bytes", "activations_bytes"):  # the tall segments carry theirs
                assert fmt_mib(getattr(d, key)) in texts
    peaks = [t.get_text() for t in ax.texts if t.get_gid() == "peak"]
    assert peaks == [fmt_mib(d.peak_bytes) for v in report.variants for d in v.memory.devices]


def test_estimated_bars_are_hatched_and_measured_ones_not(monkeypatch, tmp_path):
    ax = _figure(monkeypatch, plots.plot_memory, _memory_report(), tmp_path).axes[0]
    sources = ["estimated", "measured", "estimated", "estimated"]  # one per bar, in order
    for container in ax.containers:
        hatches = [p.get_hatch() for p in container.patches]
        assert hatches == [plots.ESTIMATED_HATCH if s == "estimated" else None for s in sources]
    legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    assert legend[plots.ESTIMATED_LABEL].get_hatch() == plots.ESTIMATED_HATCH
    assert not legend[plots.MEASURED_LABEL].get_hatch()
    assert "estimated and measured" in ax.get_title()


def test_ranks_rss_is_a_labelled_marker_beside_the_estimate(monkeypatch, tmp_path):
    ax = _figure(monkeypatch, plots.plot_memory, _memory_report(), tmp_path).axes[0]
    rss = [t.get_text() for t in ax.texts if t.get_gid() == "rss"]
    assert rss == ["RSS 700.0", "RSS 650.0"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert plots.RSS_LABEL in labels and "measured" in plots.RSS_LABEL
    assert ax.get_ylim()[1] > 700  # the marker is on the axes, above its estimate (335 MiB)
    assert "305.0" in [t.get_text() for t in ax.texts]  # rank 0's estimated peak, its bar's top


def test_memory_legend_names_only_what_is_drawn(monkeypatch, tmp_path):
    report = _report([_variant("a", [_device("cpu", "estimated", (10, 10, 10, 20, 0))], [])])
    ax = _figure(monkeypatch, plots.plot_memory, report, tmp_path).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert plots.ESTIMATED_LABEL in labels and plots.MEASURED_LABEL not in labels
    assert plots.RSS_LABEL not in labels and "input batch" not in labels  # no RSS, no input bytes drawn


def _suptitle(monkeypatch, report, tmp_path) -> tuple[str, object]:
    fig = _figure(monkeypatch, plots.plot_throughput, report, tmp_path)
    return fig._suptitle.get_text(), fig


def _dashed(fig) -> bool:
    return any(line.get_linestyle() == "--" for ax in fig.axes for line in ax.get_lines())


def test_no_dashed_note_without_a_dashed_line(monkeypatch, tmp_path):
    title, fig = _suptitle(monkeypatch, _report([_variant("a", None, _results("a", 3))]), tmp_path)
    assert not _dashed(fig) and "dashed" not in title
    compiled = _variant("a+compile", None, _results("a", 3), compiled=True)
    title, fig = _suptitle(monkeypatch, _report([_variant("a", None, _results("a", 3)), compiled]), tmp_path)
    assert _dashed(fig) and "dashed: torch.compile" in title


@pytest.mark.parametrize("repeats", [3, 5])
def test_the_note_gives_the_repeats_behind_the_error_bars(monkeypatch, tmp_path, repeats):
    title, fig = _suptitle(monkeypatch, _report([_variant("a", None, _results("a", repeats))]), tmp_path)
    assert f"error bars: half the range of the {repeats} timed repeats" in title
    assert "rough spread" not in title and "(max - min) / 2" in title
    assert all(ax.containers and ax.containers[0].has_yerr for ax in fig.axes)


def test_two_repeats_are_called_a_rough_spread(monkeypatch, tmp_path):
    title, _fig = _suptitle(monkeypatch, _report([_variant("a", None, _results("a", 2))], repeats=2), tmp_path)
    assert "the 2 timed repeats" in title and "only 2 repeats: a rough spread" in title


def test_one_repeat_draws_no_error_bars_and_says_so(monkeypatch, tmp_path):
    title, fig = _suptitle(monkeypatch, _report([_variant("a", None, _results("a", 1))], repeats=1), tmp_path)
    assert "none drawn, 1 repeat each" in title
    assert all(not c.has_yerr for ax in fig.axes for c in ax.containers)


def test_repeats_come_from_the_records_before_the_config(monkeypatch, tmp_path):
    report = _report([_variant("a", None, _results("a", 4))], repeats=2)  # the records hold 4 each
    title, _fig = _suptitle(monkeypatch, report, tmp_path)
    assert "the 4 timed repeats" in title


def test_error_bar_note_mixed_counts():
    assert plots.error_bar_note(set(), set()) == ""
    assert "2 to 3 timed repeats" in plots.error_bar_note({2, 3}, set())
    assert "only 2 repeats for some" in plots.error_bar_note({2, 3}, set())
    assert "no bars on the lines with 1 repeat" in plots.error_bar_note({3}, {1})


def test_an_rss_far_above_the_bars_goes_off_scale_with_its_number(monkeypatch, tmp_path):
    tiny = [_device("cpu (rank 0)", "estimated", (1, 1, 1, 1, 0), rss=700)]  # a tiny net, a whole process
    ax = _figure(monkeypatch, plots.plot_memory, _report([_variant("dual/ranks", tiny, [])]), tmp_path).axes[0]
    assert ax.get_ylim()[1] < 10  # the bar (4 MiB) stays readable
    assert [t.get_text() for t in ax.texts if t.get_gid() == "rss"] == ["RSS 700.0\n(off scale)"]


def test_the_table_and_markdown_say_which_ranks_figure_is_measured():
    from alexnet2gpu.report.compare import compare_markdown

    report = _memory_report()
    report.config.update(batch_sizes=[8, 16], warmup=0, steps=1, image_size=None, width=1.0)
    text = compare_markdown(report)
    assert "estimated; process peak RSS 700.0 MiB measured (the whole process, not the peak column)" in text
    assert "`dual/ranks`: the `source` column also gives each process's peak RSS, **measured**" in text
    assert "estimated bars are hatched" in text
    plain = _report([_variant("a", [_device("cpu", "estimated", (1, 1, 1, 1, 0))], [])])
    plain.config.update(report.config)
    assert "peak RSS" not in compare_markdown(plain)
