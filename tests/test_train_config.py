"""One declaration per training setting: `alexnet2gpu train`'s flags are made from
TrainConfig's fields (name, default, help, choices), a refused setting names the field in
Python and the flag on the command line, and a resume refuses another recipe."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

import pytest

from alexnet2gpu.cli import main
from alexnet2gpu.cli import train as train_cli
from alexnet2gpu.errors import ConfigError
from alexnet2gpu.train.config import SettingError, TrainConfig


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alexnet2gpu train")
    train_cli.add_arguments(parser)
    return parser


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return parser._option_string_actions[flag]


def test_every_setting_has_its_flag_with_the_fields_default(parser):
    flagged = [f for f in fields(TrainConfig) if f.init and f.metadata.get("cli") != "none"]
    assert {f.name for f in fields(TrainConfig)} - {f.name for f in flagged} == {"interrupt_dir"}
    for setting in flagged:
        action = _action(parser, train_cli.flag_of(setting))
        assert action.dest == setting.name, setting.name
        assert action.default == setting.default, setting.name  # the shared ones too (cli.arguments)
        if "choices" in setting.metadata:
            assert tuple(action.choices) == tuple(setting.metadata["choices"]), setting.name


def test_shared_flags_are_the_model_and_placement_ones(parser):
    shared = {f.name for f in fields(TrainConfig) if f.metadata.get("cli") == "shared"}
    assert shared == {"model", "in_channels", "num_classes", "image_size", "width", "dropout", "placement", "devices"}
    assert _action(parser, "--model").choices is not None and _action(parser, "--placement").choices is not None


def test_the_cli_declares_no_setting_of_its_own(parser):
    settings = {f.name for f in fields(TrainConfig)}
    cli_only = {a.dest for a in parser._actions if a.dest not in settings}
    assert cli_only == {"help", "plot", "log_every", "quiet"}


def test_every_flag_prints_its_default(parser):
    for action in parser._actions:
        if action.dest != "help":
            assert "default:" in action.help, action.option_strings
    text = parser.format_help()
    assert "default: None" not in text and "(default: 128)" not in text  # the recipe's, said so
    assert "--recipe {paper,d2l}" in text and "--schedule {plateau,constant,cosine}" in text


def test_no_flags_give_the_default_config(parser):
    config = train_cli.config_from_args(parser.parse_args([]))
    assert config.interrupt_dir and config.interrupt_dir.startswith("runs")  # only when Ctrl-C stops it
    assert replace(config, interrupt_dir=None) == TrainConfig()


def test_flags_reach_their_fields(parser, tmp_path):
    args = parser.parse_args(
        [
            "--batch-size",
            "7",
            "--no-ten-crop",
            "--compile",
            "--lr",
            "0.5",
            "--resume",
            "--checkpoint-dir",
            str(tmp_path),
        ]
    )
    config = train_cli.config_from_args(args)
    assert (config.batch_size, config.ten_crop, config.compile, config.lr) == (7, False, True, 0.5)
    assert config.resume is True and config.interrupt_dir is None
    assert parser.parse_args(["--resume", "a.pt"]).resume == "a.pt"


@pytest.mark.parametrize(
    "settings, python, cli",
    [
        ({"batch_size": 0}, "batch_size must be at least 1, got 0", "--batch-size must be at least 1, got 0"),
        ({"keep": 0}, "keep must be at least 1, got 0", "--keep must be at least 1, got 0"),
        ({"checkpoint_every": -1}, "checkpoint_every must be 0 or more steps", "--checkpoint-every must be 0 or more"),
        ({"val_size": -1}, "val_size must be 0 or more images, got -1", "--val-size must be 0 or more images"),
        ({"weight_decay": -0.1}, "weight_decay -0.1 is out of range: give 0 or more", "--weight-decay -0.1 is out"),
        ({"timeout": 0.0}, "timeout 0 is out of range", "--timeout 0 is out of range"),
        (
            {"resume": True},
            "resume without a path needs checkpoint_dir",
            "--resume without a path needs --checkpoint-dir",
        ),
        ({"schedule": "step"}, "unknown schedule 'step': choose one of plateau", "unknown --schedule 'step'"),
        (
            {"model": "torchvision"},
            "model torchvision with recipe paper does not learn on Fashion-MNIST",
            "--model torchvision with --recipe paper does not learn on Fashion-MNIST (no LRN: its loss on 0-255 inputs "
            "starts near 20 and diverged, measured): use --recipe d2l, or --model dual/half/simplified",
        ),
    ],
)
def test_errors_name_the_field_in_python_and_the_flag_on_the_command_line(settings, python, cli):
    with pytest.raises(SettingError) as refused:
        TrainConfig(**settings)
    message = str(refused.value)
    assert isinstance(refused.value, ConfigError) and message.startswith(python) and "--" not in message, message
    assert refused.value.naming(train_cli.flag_of).startswith(cli)


def test_a_path_with_braces_or_a_field_name_is_left_alone(tmp_path):
    odd = tmp_path / "{batch_size}" / "data"
    odd.parent.mkdir()
    odd.write_text("x")
    with pytest.raises(SettingError) as refused:
        TrainConfig(data=str(odd))
    assert refused.value.naming(train_cli.flag_of).startswith(f"--data {odd} is a file")


def test_the_command_line_names_the_flag(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["train", "--data", "synthetic", "--batch-size", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err == "alexnet2gpu train: error: --batch-size must be at least 1, got 0\n", err


def test_resume_refuses_a_checkpoint_of_another_recipe(tmp_path):
    from alexnet2gpu.io.checkpoints import CHECKPOINT_FORMAT
    from alexnet2gpu.train.checkpointing import check_resume_config

    source = Path(tmp_path / "step-00000002.pt")
    saved = {"model": "dual", "batch_size": 128, "seed": 0, "data": "synthetic", "recipe": "paper"}
    state = {"format": CHECKPOINT_FORMAT, "config": saved}
    check_resume_config(state, TrainConfig(data="synthetic"), source)  # the same recipe resumes
    with pytest.raises(ConfigError) as refused:
        check_resume_config(state, TrainConfig(data="synthetic", recipe="d2l", momentum=0.9), source)
    assert str(refused.value) == (
        f"checkpoint {source} was written by a run with recipe paper; this run has recipe d2l: resume with "
        f"--recipe paper, or start a new run with --weights {source}"
    )
    old = {"format": CHECKPOINT_FORMAT, "config": {k: v for k, v in saved.items() if k != "recipe"}}
    check_resume_config(old, TrainConfig(data="synthetic", recipe="d2l", momentum=0.9), source)  # saved none
