"""The command line answers before torch loads: ``--help``, ``--version`` and every refused
flag or value parse without importing torch, torchvision, matplotlib or rich; a mistyped
flag, value or command names the closest that would work and the sub-command's help."""

import importlib
import json
import subprocess
import sys
import time
import types

import pytest

import alexnet2gpu
from alexnet2gpu.cli import main

COMMANDS = ("summary", "verify", "bench", "memory", "compare", "train", "evaluate")
HEAVY = ("torch", "torchvision", "matplotlib", "rich")

# Each argv through alexnet2gpu.cli.main in a fresh interpreter, then what it had imported.
_PARSE_ONLY = """
import contextlib, io, json, sys
from alexnet2gpu.cli import main
from alexnet2gpu.cli.main import build_parser

build_parser()
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    results.append([argv, code, err.getvalue()])
heavy = sorted(name for name in sys.modules if name.split(".")[0] in json.loads(sys.argv[2]))
print(json.dumps({"results": results, "heavy": heavy}))
"""


def test_help_version_and_refused_flags_import_no_torch():
    bad = [[command, "--no-such-flag"] for command in COMMANDS]
    bad += [
        ["trian"],
        ["train", "--placement", "splt"],
        ["bench", "--repeats", "many"],
        ["summary", "--model", "vgg"],
        ["memory", "--source"],
        ["bench", "--precision", "fp8"],
        ["verify", "--precision", "bf15"],
        ["compare", "--precision", "fp32,int8"],
        ["verify", "--channels-last"],
    ]
    helps = [["--help"], ["--version"], *[[command, "--help"] for command in COMMANDS]]
    result = subprocess.run(
        [sys.executable, "-c", _PARSE_ONLY, json.dumps(bad + helps), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["heavy"] == []
    for argv, code, err in report["results"]:
        if argv in helps:
            assert code == 0 and err == "", (argv, err)
        else:
            command = "alexnet2gpu" if argv == ["trian"] else f"alexnet2gpu {argv[0]}"
            assert code == 2, (argv, code, err)
            assert err.count("\n") == 1 and err.endswith(f" (see {command} --help)\n"), (argv, err)


def test_help_answers_quickly():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "alexnet2gpu", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and result.stdout.startswith("usage: alexnet2gpu"), result.stderr
    assert elapsed < 5.0, f"alexnet2gpu --help took {elapsed:.1f} s (about 0.3 s on an idle 2-core CPU)"


def _refusal(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"alexnet2gpu {alexnet2gpu.__version__}\n"
    try:
        from importlib.metadata import PackageNotFoundError, version

        installed = version("alexnet2gpu")
    except PackageNotFoundError:
        pytest.skip("alexnet2gpu is not installed: nothing to compare __version__ with")
    assert installed == alexnet2gpu.__version__  # pyproject.toml's version


def test_a_mistyped_flag_names_the_closest_and_the_sub_commands_help(capsys):
    assert _refusal(capsys, ["train", "--stpes", "3"]) == (
        "alexnet2gpu train: error: unrecognized arguments: --stpes 3 (did you mean --steps?) "
        "(see alexnet2gpu train --help)\n"
    )
    assert _refusal(capsys, ["bench", "--stpes=3", "--repaets", "2"]) == (
        "alexnet2gpu bench: error: unrecognized arguments: --stpes=3 --repaets 2 (did you mean --steps, --repeats?) "
        "(see alexnet2gpu bench --help)\n"
    )
    assert _refusal(capsys, ["summary", "--zzzz"]) == (
        "alexnet2gpu summary: error: unrecognized arguments: --zzzz (see alexnet2gpu summary --help)\n"
    )


def test_a_mistyped_command_or_choice_names_the_closest(capsys):
    err = _refusal(capsys, ["trian"])
    assert err.startswith("alexnet2gpu: error: argument COMMAND: invalid choice: 'trian' (choose from 'summary'")
    assert err.endswith(" (did you mean 'train'?) (see alexnet2gpu --help)\n") and err.count("\n") == 1
    err = _refusal(capsys, ["memory", "--placement", "splt"])
    assert err.startswith("alexnet2gpu memory: error: argument --placement: invalid choice: 'splt'")
    assert err.endswith(" (did you mean 'split'?) (see alexnet2gpu memory --help)\n")


def test_precision_flags_parse_and_a_bad_one_names_the_closest(capsys):
    from alexnet2gpu.cli.main import build_parser

    args = build_parser().parse_args(["bench", "--precision", "bf16", "--channels-last", "--no-cudnn-benchmark"])
    assert (args.precision, args.channels_last, args.cudnn_benchmark) == ("bf16", True, False)
    args = build_parser().parse_args(["bench"])
    assert (args.precision, args.channels_last, args.cudnn_benchmark) == ("fp32", False, None)
    assert build_parser().parse_args(["verify", "--precision", "fp16"]).precision == "fp16"
    args = build_parser().parse_args(["compare", "--precision", "fp32,bf16", "--channels-last"])
    assert (args.precision, args.channels_last) == (["fp32", "bf16"], True)
    assert build_parser().parse_args(["compare"]).precision is None  # fp32, and bf16 where CUDA runs
    err = _refusal(capsys, ["bench", "--precision", "bf61"])
    assert "invalid choice: 'bf61'" in err and "(did you mean 'bf16'?)" in err and err.count("\n") == 1
    err = _refusal(capsys, ["compare", "--precision", "fp32,bf61"])
    assert err == (
        "alexnet2gpu compare: error: argument --precision: unknown precision 'bf61' in 'fp32,bf61': "
        "choose from fp32, bf16, fp16 (see alexnet2gpu compare --help)\n"
    )


def test_the_parsers_names_match_the_code_that_uses_them():
    # The names the parser offers are declared once, torch-free; these are the places that
    # must stay in step with them (the builders, the initialisations, the recipes).
    from alexnet2gpu import models
    from alexnet2gpu.models import init, names
    from alexnet2gpu.train import config
    from alexnet2gpu.train import names as train_names

    assert set(models._builders()) == set(names.MODEL_NAMES)
    assert names.INIT_NAMES == tuple(init.INITS)
    assert train_names.RECIPE_NAMES == tuple(config.RECIPES)


@pytest.mark.parametrize("package", ["alexnet2gpu", "models", "parallel", "train", "data"])
def test_every_public_name_loads_on_first_use(package):
    module = importlib.import_module(package if package == "alexnet2gpu" else f"alexnet2gpu.{package}")
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
    if package == "alexnet2gpu":
        from alexnet2gpu import Layout, build_model, place  # noqa: F401  the README's import

        assert module.__all__ == [
            "MODEL_NAMES",
            "PLACEMENTS",
            "Alexnet2gpuError",
            "ConfigError",
            "Layout",
            "build_model",
            "from_grouped_state_dict",
            "place",
            "seed_dropout",
            "smallest_image_size",
            "to_grouped_state_dict",
        ]


def test_parallel_place_stays_the_function_when_its_module_loads():
    # the import system binds a submodule on its package when it loads it: here it would
    # shadow the function place() that the package exports under the same name
    from alexnet2gpu import parallel
    from alexnet2gpu.parallel import place

    submodule = sys.modules["alexnet2gpu.parallel.place"]
    parallel.place = submodule  # what importing alexnet2gpu.parallel.place first does
    assert parallel.place is place and not isinstance(parallel.place, types.ModuleType)
