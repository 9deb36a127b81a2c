"""`summary` and `verify` from the command line, and clear one-line errors for bad flags."""

import json
import subprocess
import sys

import pytest

from alexnet2gpu.cli import main

from .test_models import SEED_SHAPES


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_summary_split_plans_without_a_gpu(capsys):
    record = run_json(capsys, "summary", "--model", "dual", "--placement", "split", "--json", "-")
    assert record["model"] == "dual" and record["placement"] == "split"
    assert record["params_total"] == 60_965_224
    assert record["params_per_device"] == [
        {"device": "cuda:0", "params": 32_531_112},
        {"device": "cuda:1", "params": 28_434_112},
    ]
    layers = {layer["name"]: layer for layer in record["layers"]}
    assert layers["tower_b.conv1"]["device"] == "cuda:1" and layers["tower_b.conv1"]["output_shape"] == [1, 48, 55, 55]
    assert layers["fc8"]["device"] == "cuda:0" and layers["fc8"]["params"] == 4_097_000
    assert set(record["layers"][0]) == {"name", "kind", "device", "output_shape", "params"}


def test_summary_of_simplified_is_the_seeds_printout(capsys):
    record = run_json(capsys, "summary", "--model", "simplified", "--json", "-")
    shapes = [layer["output_shape"] for layer in record["layers"] if layer["kind"] not in ("ReLU", "Dropout")]
    assert shapes == SEED_SHAPES
    assert record["params_total"] == 46_764_746


def test_summary_table_and_json_file(capsys, tmp_path):
    out = tmp_path / "s.json"
    assert main(["summary", "--placement", "split", "--width", "0.0625", "--image-size", "64", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tower_b.conv3" in table and "cuda:1" in table and "parameters in all" in table
    assert json.loads(out.read_text())["placement"] == "split"


def test_summary_plans_replicas_per_process_without_torchrun(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    record = run_json(capsys, "summary", "--model", "simplified", "--placement", "replicas", "--json", "-")
    assert record["placement"] == "replicas" and record["params_total"] == 46_764_746
    assert record["params_per_device"] == [{"device": f"rank {r}", "params": 46_764_746} for r in (0, 1)]
    assert {layer["device"] for layer in record["layers"]} == {"every rank"}
    assert "each of the 2 processes holds the whole net" in record["note"]


def test_summary_plans_hybrid_with_fc6_to_fc8_split(capsys):
    record = run_json(
        capsys, "summary", "--model", "torchvision", "--placement", "hybrid", "--processes", "4", "--json", "-"
    )
    assert record["params_total"] == 61_100_840
    layers = {layer["name"]: layer for layer in record["layers"]}
    fc6, fc8 = layers["classifier.1"], layers["classifier.6"]
    assert fc6["output_shape"] == [4, 1024] and fc6["params"] == 1024 * (9216 + 1)
    assert fc8["output_shape"] == [4, 1000] and fc8["params"] == 250 * (4096 + 1)  # logits gathered whole
    assert layers["features.0"]["output_shape"] == [1, 64, 56, 56]  # the trunk: this process's image
    trunk = 61_100_840 - (4096 * 9217 + 4096 * 4097 + 1000 * 4097)
    per_rank = trunk + 1024 * 9217 + 1024 * 4097 + 250 * 4097
    assert record["params_per_device"] == [{"device": f"rank {r}", "params": per_rank} for r in range(4)]


def test_summary_hybrid_shares_uneven_units_as_dtensor_does(capsys):
    """10 classes over 4 processes: torch.chunk's 3, 3, 3, 1."""
    record = run_json(
        capsys, "summary", "--model", "simplified", "--placement", "hybrid", "--processes", "4", "--json", "-"
    )
    counts = [d["params"] for d in record["params_per_device"]]
    assert counts[0] == counts[1] == counts[2] == counts[3] + 2 * (4096 + 1)


def test_summary_plans_ranks_as_towers_per_rank(capsys):
    record = run_json(capsys, "summary", "--placement", "ranks", "--processes", "4", "--json", "-")
    assert [d["params"] for d in record["params_per_device"]] == [32_531_112, 28_434_112] * 2
    layers = {layer["name"]: layer for layer in record["layers"]}
    assert layers["fc8"]["device"] == "even ranks (tower a, fc8)"
    assert layers["tower_b.conv1"]["device"] == "odd ranks (tower b)"


def test_verify_passes_here(capsys):
    result = run_json(capsys, "verify", "--json", "-")
    assert [c["placement"] for c in result["checks"]] == ["towers", "grouped", "split"]
    assert all(c["ok"] and c["grads_rel_err"] < 1e-5 for c in result["checks"])


def test_verify_fails_on_a_mismatch(capsys, monkeypatch):
    from alexnet2gpu.parallel.grouped import GroupedDualAlexNet

    real = GroupedDualAlexNet.forward
    monkeypatch.setattr(GroupedDualAlexNet, "forward", lambda self, x: real(self, x) * 1.001)
    assert main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH in grouped" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["summary", "--image-size", "50"], "image size 50 is too small for 'dual': the smallest that works is 64"),
        (["summary", "--placement", "split", "--devices", "cpu"], "placement 'split' takes 2 device(s), got 1"),
        (["summary", "--devices", "gpu7"], "'gpu7' is not a device"),
        (["summary", "--model", "simplified", "--placement", "split"], "a single-stream net runs on one device"),
        (["summary", "--width", "-1"], "width must be positive, got -1.0"),
        (["summary", "--placement", "hybrid"], "placement 'hybrid' splits a single stream's fc6-fc8"),
        (["summary", "--placement", "ranks", "--processes", "3"], "placement 'ranks' plans an even number"),
        (["summary", "--model", "half", "--placement", "replicas", "--processes", "1"], "at least 2 processes, got 1"),
    ],
)
def test_bad_flags_are_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_model_is_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "--model", "vgg"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'vgg' (choose from 'dual'" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_python_dash_m_works():
    result = subprocess.run(
        [sys.executable, "-m", "alexnet2gpu", "summary", "--model", "simplified", "--width", "0.0625", "--json", "-"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "simplified"


@pytest.mark.parametrize("command", ["summary", "verify"])
@pytest.mark.parametrize("where", ["a folder", "inside a file"])
def test_an_unusable_json_path_is_refused_before_any_work(capsys, tmp_path, command, where):
    (tmp_path / "file").write_text("")
    path = tmp_path if where == "a folder" else tmp_path / "file" / "out.json"
    assert main([command, "--json", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"alexnet2gpu {command}: error: --json {path}")
