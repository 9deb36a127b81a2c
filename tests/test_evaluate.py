"""`alexnet2gpu evaluate`: a run's final checkpoint gives that run's final test accuracy
exactly; the record adds up; any placement's checkpoint evaluates the same in another; the
PNG and JSON are written; refusals are one line. Tiny nets on tiny Fashion-MNIST files."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from alexnet2gpu.checks.evaluate import evaluate_checkpoint, evaluation_data, read_spec
from alexnet2gpu.cli import evaluate as evaluate_cli
from alexnet2gpu.cli.main import COMMANDS, main
from alexnet2gpu.data.fashion_mnist import CLASS_NAMES
from alexnet2gpu.errors import ConfigError
from alexnet2gpu.io.checkpoints import load_checkpoint, save_checkpoint
from alexnet2gpu.train import TrainConfig, train
from alexnet2gpu.train.build import build_data, resolve_run_layout

from .test_data import write_folder
from .test_train import _small_fashion_mnist
from .tiny import TINY_SIZE, TINY_WIDTH


@pytest.fixture(autouse=True)
def _one_thread_and_own_cache(one_thread, monkeypatch, tmp_path):
    """One thread (tiny nets, a busy 2-core machine) and a mean-image cache of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _config(tmp_path, model="dual", name="run", **overrides) -> TrainConfig:
    """A tiny run on 48 random Fashion-MNIST-shaped images, none held out (checkpoints do
    not record a hold-out yet: see test_a_checkpoint_records_the_input_it_was_trained_on)."""
    data_dir = tmp_path / "fmnist"
    if not data_dir.exists():
        _small_fashion_mnist(data_dir)
    config = dict(
        model=model,
        width=TINY_WIDTH,
        image_size=TINY_SIZE[model],
        data="fashion-mnist",
        data_dir=str(data_dir),
        batch_size=16,
        steps=5,
        workers=0,
        checkpoint_dir=str(tmp_path / name),
        val_size=0,
        schedule="constant",
    )
    config.update(overrides)
    return TrainConfig(**config)


def _run(tmp_path, model="dual", name="run", **overrides):
    """The tiny run: (its result, the IDX folder)."""
    config = _config(tmp_path, model, name, **overrides)
    return train(config), config.data_dir


def _assert_same_input(config: TrainConfig, checkpoint: str, split: str = "test", **evaluate_kw) -> None:
    """evaluate's batches are the run's own, bit for bit (pixels, mean image, size, hold-out)."""
    run = build_data(config, resolve_run_layout(config))
    spec = read_spec(load_checkpoint(checkpoint), checkpoint, evaluate_kw.pop("image_size", None))
    ours = evaluation_data(spec, split, batch_size=spec.batch_size, ten_crop=False, device="cpu", **evaluate_kw)
    theirs = list(run.test if split == "test" else run.val)
    assert len(list(ours.loader)) == len(theirs) > 0
    for (x, y), (x_run, y_run) in zip(ours.loader, theirs):
        assert torch.equal(x, x_run) and torch.equal(y, y_run)


def _records_input(checkpoint: str) -> bool:
    return "image_size" in load_checkpoint(checkpoint)["config"]


@pytest.mark.parametrize(
    "model, recipe, placement",
    [("dual", "paper", "auto"), ("dual", "paper", "towers"), ("simplified", "d2l", "auto")],
)
def test_final_checkpoint_gives_the_runs_final_test_accuracy(tmp_path, model, recipe, placement):
    config = _config(tmp_path, model, recipe=recipe, placement=placement)
    result = train(config)
    kw = dict(data_dir=config.data_dir, image_size=TINY_SIZE[model])
    _assert_same_input(config, result.checkpoint, **kw)
    record = evaluate_checkpoint(result.checkpoint, placement=result.placement, **kw)
    assert record.top1 == result.test_accuracy  # exactly: the same net, pixels, batches and device
    assert record.images == 48 and record.crops == 1 and record.placement == result.placement
    assert record.pixels == ("mean-image" if recipe == "paper" else "unit")


def test_a_synthetic_run_evaluates_on_its_held_out_batches(tmp_path):
    config = _config(tmp_path, data="synthetic", data_dir=None, num_classes=10, steps=3, placement="towers")
    result = train(config)
    record = evaluate_checkpoint(result.checkpoint, image_size=TINY_SIZE["dual"], placement="towers")
    assert record.top1 == result.test_accuracy and record.images == 2 * 16
    assert record.classes == [str(c) for c in range(10)]


def test_the_record_adds_up(tmp_path):
    result, data_dir = _run(tmp_path, steps=8)
    record = evaluate_checkpoint(result.checkpoint, data_dir=data_dir, image_size=TINY_SIZE["dual"])
    assert record.top_k == 5 and 0.0 <= record.top1 <= record.top5 <= 1.0
    assert record.classes == list(CLASS_NAMES) and [c.name for c in record.per_class] == list(CLASS_NAMES)
    assert sum(c.images for c in record.per_class) == record.images == sum(map(sum, record.confusion))
    assert sum(c.correct for c in record.per_class) == round(record.top1 * record.images)
    for i, c in enumerate(record.per_class):
        assert c.images == sum(record.confusion[i]) and c.correct == record.confusion[i][i]
        assert c.accuracy == (c.correct / c.images if c.images else None)
    assert json.loads(json.dumps(record.to_json()))["confusion"] == record.confusion


def test_a_towers_checkpoint_evaluates_the_same_under_grouped(tmp_path):
    result, data_dir = _run(tmp_path, placement="towers", steps=8)
    assert load_checkpoint(result.checkpoint)["config"]["placement"] == "towers"
    kw = dict(data_dir=data_dir, image_size=TINY_SIZE["dual"])
    towers = evaluate_checkpoint(result.checkpoint, placement="towers", **kw)
    grouped = evaluate_checkpoint(result.checkpoint, placement="grouped", **kw)
    split = evaluate_checkpoint(result.checkpoint, placement="split", devices="cpu,cpu", **kw)
    assert grouped.placement == "grouped" and split.device == "cpu,cpu"
    for other in (grouped, split):
        assert (other.top1, other.top5, other.confusion) == (towers.top1, towers.top5, towers.confusion)


def test_a_checkpoint_records_the_input_it_was_trained_on(tmp_path):
    """No flags: the data folder, training subset and hold-out (the mean image's) and the
    size come from the checkpoint; the validation split is the run's too."""
    config = _config(tmp_path, train_subset=32, steps=4, val_size=None, schedule=None)  # the paper's plateau
    result = train(config)
    assert _records_input(result.checkpoint)
    _assert_same_input(config, result.checkpoint)
    _assert_same_input(config, result.checkpoint, "val")
    record = evaluate_checkpoint(result.checkpoint)
    assert record.top1 == result.test_accuracy and record.images == 48 and record.notes == []
    val = evaluate_checkpoint(result.checkpoint, split="val")
    assert val.top1 == result.val_accuracy and val.images == 4 and val.split == "val"  # 48 // 12 held out


def test_ten_crops_of_an_image_folder(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=(4, 3))
    config = dict(width=TINY_WIDTH, image_size=TINY_SIZE["dual"], data=str(root), batch_size=4, steps=2, workers=0)
    config.update(val_size=0, schedule="constant")
    result = train(TrainConfig(**config, ten_crop=True, placement="towers", checkpoint_dir=str(tmp_path / "run")))
    record = evaluate_checkpoint(
        result.checkpoint, ten_crop=True, image_size=TINY_SIZE["dual"], placement="towers", workers=0
    )
    assert record.crops == 10 and record.images == 6 and record.classes == ["cat", "dog"]
    assert record.top1 == result.test_accuracy
    assert record.top_k == 2 and record.top5 == 1.0 and record.single_crop["top5"] == 1.0
    single = evaluate_checkpoint(
        result.checkpoint, ten_crop=False, image_size=TINY_SIZE["dual"], placement="towers", workers=0
    )
    assert single.crops == 1 and single.single_crop is None
    assert single.top1 == pytest.approx(record.single_crop["top1"])  # the centre crop is the single crop


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_command_writes_the_png_and_the_json(tmp_path, capsys):
    result, data_dir = _run(tmp_path)
    common = [result.checkpoint, "--data-dir", data_dir, "--image-size", str(TINY_SIZE["dual"]), "--device", "cpu"]
    assert evaluate_cli.run(_args([*common, "--json", str(tmp_path / "out" / "eval.json")])) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "Ankle boot" in out and "T-shirt/top" in out
    png = tmp_path / "out" / "eval-confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["top1"] == result.test_accuracy and saved["confusion_png"] == str(png)
    assert len(saved["confusion"]) == 10 and saved["device"] == "cpu"
    assert evaluate_cli.run(_args(common)) == 0  # no --json: confusion.png beside the checkpoint
    assert (tmp_path / "run" / "confusion.png").is_file()


def _main(monkeypatch, argv: list[str]) -> int:
    """``alexnet2gpu evaluate ...`` through the real entry point (registered for the test
    if main.COMMANDS does not list it yet)."""
    monkeypatch.setitem(COMMANDS, "evaluate", (evaluate_cli, "evaluate a checkpoint"))
    return main(["evaluate", *argv])


def test_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    assert _main(monkeypatch, [str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert err == f"alexnet2gpu evaluate: error: checkpoint {tmp_path / 'nope.pt'} does not exist\n"


def test_refusals_are_one_line(tmp_path, monkeypatch, capsys):
    result, data_dir = _run(tmp_path, steps=2)
    base = [result.checkpoint, "--data-dir", data_dir]
    size = ["--image-size", str(TINY_SIZE["dual"])]
    for argv, words in (
        ([*base, *size, "--split", "val"], "--split val: the run holds out no validation images"),
        ([*base, *size, "--ten-crop"], "--ten-crop needs an image folder"),
        ([*base, *size, "--placement", "single"], "placement 'single' is for the single-stream nets"),
        ([*base, *size, "--placement", "ranks"], "evaluate runs in one process: use --placement grouped"),
        ([*base, *size, "--batch-size", "0"], "--batch-size must be at least 1"),
        ([*base, "--image-size", "100"], ("x100 px, width", "--image-size 100: ")),  # fc6 differs: not the run's net
    ):
        code = _main(monkeypatch, argv)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("alexnet2gpu evaluate: error: "), (argv, err)
        assert any(w in err for w in ((words,) if isinstance(words, str) else words)), err
    (tmp_path / "not-a-checkpoint.pt").write_bytes(b"junk")
    assert _main(monkeypatch, [str(tmp_path / "not-a-checkpoint.pt")]) == 1
    assert "has no sha256 file" in capsys.readouterr().err


def test_an_unrecorded_size_that_does_not_fit_names_the_flag(tmp_path):
    # A checkpoint written before checkpoints recorded their input (as the committed
    # docs/runs checkpoints were): made here by removing those keys.
    result, data_dir = _run(tmp_path, steps=2)
    state = load_checkpoint(result.checkpoint)
    for key in ("in_channels", "image_size", "pixels", "data_root", "data_dir", "train_subset", "val_size", "ten_crop"):
        del state["config"][key]
    old = save_checkpoint(tmp_path / "old" / "step-00000002.pt", state)
    with pytest.raises(ConfigError, match="does not record its image size .* pass --image-size"):
        evaluate_checkpoint(old, data_dir=data_dir)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_checkpoint_evaluates_on_cuda(tmp_path):
    result, data_dir = _run(tmp_path, steps=8, devices="cpu")
    kw = dict(data_dir=data_dir, image_size=TINY_SIZE["dual"], placement="grouped")
    cpu = evaluate_checkpoint(result.checkpoint, devices="cpu", **kw)
    cuda = evaluate_checkpoint(result.checkpoint, devices="cuda:0", **kw)
    assert cuda.device == "cuda:0" and cuda.images == cpu.images == 48
    assert abs(cuda.top1 - cpu.top1) <= 1 / 48  # cuDNN's sums may move one near-tie


def test_a_thousand_classes_draw_at_a_fixed_size_and_list_the_worst(tmp_path, capsys):
    # ImageNet's 1,000 classes: a name and a count per cell made a 550-inch figure (the
    # process was killed at 22.6 GB); now the matrix is drawn alone at 10 inches.
    from PIL import Image

    from alexnet2gpu.report.evaluate import MAX_NAMED_CLASSES

    config = TrainConfig(
        model="dual", data="synthetic", num_classes=1000, width=TINY_WIDTH, image_size=TINY_SIZE["dual"],
        batch_size=4, steps=2, checkpoint_dir=str(tmp_path / "run"), devices="cpu", placement="towers",
    )  # fmt: skip
    result = train(config)
    assert evaluate_cli.run(_args([result.checkpoint, "--json", str(tmp_path / "eval.json")])) == 0
    out = " ".join(capsys.readouterr().out.split())  # the title may wrap
    assert f"the {MAX_NAMED_CLASSES} least accurate of 1,000 classes" in out
    with Image.open(tmp_path / "eval-confusion.png") as png:
        assert max(png.size) <= 1500
    assert len(json.loads((tmp_path / "eval.json").read_text())["confusion"]) == 1000
