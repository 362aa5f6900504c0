"""Bad input ends in one line that says what to do, exit code 2, nothing half-written."""

import json

import pytest
from typer.testing import CliRunner

from vislens.cli import app

runner = CliRunner()


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_every_command_has_help_with_an_example_and_json():
    for command in ("info", "eval", "world", "train-toy", "ablate", "logit-lens", "knockout",
                    "perceive", "artifacts", "prefix", "study", "surface", "attention",
                    "capture", "patch"):
        result = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, command
        assert "Example: vislens" in result.output, command
        assert "--json" in result.output, command


def test_missing_model_directory(tmp_path):
    line = _one_line_error(runner.invoke(app, ["eval", "--model", str(tmp_path / "nope")]))
    assert "config.json" in line and "llava" in line


def test_unsupported_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    line = _one_line_error(runner.invoke(app, ["info", "--model", str(tmp_path)]))
    assert "'bert'" in line and "qwen2_5_vl" in line


def test_zero_samples():
    line = _one_line_error(runner.invoke(app, ["eval", "--n", "0"]))
    assert "--n" in line


def test_missing_coco_file(tmp_path):
    out = tmp_path / "run"
    line = _one_line_error(runner.invoke(app, ["ablate", "--data", f"coco:{tmp_path / 'x'}",
                                               "--out", str(out)]))
    assert "x" in line
    assert not out.exists()


def test_bad_area_option():
    line = _one_line_error(runner.invoke(app, ["knockout", "--area", "big"]))
    assert "MIN:MAX" in line


def test_world_writes_coco_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "world"
    result = runner.invoke(app, ["world", "--out", str(out), "--n", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["scenes"] == 3
    assert (out / "annotations.json").is_file()
    _one_line_error(runner.invoke(app, ["world", "--out", str(out), "--n", "3"]))


@pytest.mark.slow  # the resume check runs inside training (~3 s)
def test_train_toy_bad_resume_writes_nothing(tmp_path):
    out = tmp_path / "toy"
    line = _one_line_error(runner.invoke(app, ["train-toy", "--out", str(out), "--resume",
                                               str(tmp_path / "stage_B.pt")]))
    assert "stage checkpoint" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_toy_bad_donor_writes_nothing(tmp_path):
    out = tmp_path / "toy"
    line = _one_line_error(runner.invoke(app, ["train-toy", "--out", str(out), "--family",
                                               "qwen", "--donor", str(tmp_path / "nope")]))
    assert "--donor" in line
    line = _one_line_error(runner.invoke(app, ["train-toy", "--out", str(out), "--donor",
                                               str(tmp_path)]))
    assert "--family qwen" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _tiny_model(tmp_path):
    from helpers_models import save

    return save("llava", tmp_path / "model")


def test_truncated_weights_are_one_line(tmp_path):
    model = _tiny_model(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    line = _one_line_error(runner.invoke(app, ["info", "--model", str(model)]))
    assert "incomplete or corrupt" in line and "model" in line


def test_an_image_that_is_not_an_image_is_named(tmp_path):
    from vislens.data import shapesworld
    from vislens.data.coco import export_coco

    data = export_coco(shapesworld.generate(4, seed=1001)[2:], tmp_path / "coco")
    broken = sorted((data / "images").iterdir())[0]
    broken.write_bytes(b"this is not a png")
    out = tmp_path / "run"
    line = _one_line_error(runner.invoke(app, ["ablate", "--data", f"coco:{data}", "--area", "0:",
                                               "--settings", "polling", "--out", str(out)]))
    assert broken.name in line and "not a readable image" in line
    assert not out.exists()


def test_cuda_without_a_gpu_and_bad_dtypes_are_one_line(tmp_path):
    import torch

    if not torch.cuda.is_available():
        line = _one_line_error(runner.invoke(app, ["eval", "--device", "cuda", "--n", "1"]))
        assert "CUDA" in line and "--device cpu" in line
    for bad in ("float8", "banana"):
        line = _one_line_error(runner.invoke(app, ["eval", "--dtype", bad, "--n", "1"]))
        assert "unknown dtype" in line


def test_options_are_checked_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    line = _one_line_error(runner.invoke(app, ["ablate", "--conditions", "object,foo", "--n", "2",
                                               "--out", str(out)]))
    assert "foo" in line and not out.exists()
    line = _one_line_error(runner.invoke(app, ["knockout", "--settings", "foo", "--n", "2",
                                               "--out", str(out)]))
    assert "foo" in line and not out.exists()
    line = _one_line_error(runner.invoke(app, ["study", "--data", "coco:", "--out", str(out)]))
    assert not out.exists()
    ok = runner.invoke(app, ["ablate", "--conditions", "object", "--settings", "polling",
                             "--n", "2", "--out", str(out), "--json"])
    assert ok.exit_code == 0, ok.output  # the corrected rerun is not refused


def test_json_mode_keeps_stderr_quiet():
    result = runner.invoke(app, ["info", "--model", "toy", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["family"] == "llava"
    assert result.stderr == ""
    loud = runner.invoke(app, ["info", "--model", "toy"])
    assert loud.exit_code == 0


def test_info_reports_the_native_size_and_example_counts():
    result = runner.invoke(app, ["info", "--model", "toy-qwen", "--json"])
    facts = json.loads(result.stdout)
    assert facts["native_image_size"].startswith("dynamic")
    assert facts["image_tokens_for"]["96x96 (ShapesWorld scene)"]["image_tokens"] == 144
    toy = json.loads(runner.invoke(app, ["info", "--model", "toy", "--json"]).stdout)
    assert toy["native_image_size"] == "96x96"


@pytest.mark.slow
def test_device_map_options_are_checked_and_run(tmp_path):
    out = tmp_path / "run"
    for args, words in ((["--device-map", "everywhere"], "auto, balanced"),
                        (["--max-memory", "0=1GiB"], "--device-map auto"),
                        (["--device-map", "auto", "--max-memory", "0"], "DEVICE=SIZE"),
                        (["--device-map", "auto", "--device", "cuda"], "leave out --device"),
                        (["--device-map", "auto", "--workers", "2"], "one or the other")):
        line = _one_line_error(runner.invoke(app, ["logit-lens", "--n", "2", "--out", str(out),
                                                   *args]))
        assert words in line and not out.exists(), (args, line)
    # on a machine without GPUs accelerate's "auto" map keeps every module on the CPU
    mapped = runner.invoke(app, ["eval", "--n", "4", "--device-map", "auto", "--max-memory",
                                 "cpu=8GiB", "--json"])
    assert mapped.exit_code == 0, mapped.output
    whole = runner.invoke(app, ["eval", "--n", "4", "--json"])
    assert json.loads(mapped.stdout)["accuracy"] == json.loads(whole.stdout)["accuracy"]


def test_out_of_memory_says_what_to_try(monkeypatch):
    import torch

    import vislens.models

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(vislens.models, "load", full)
    line = _one_line_error(runner.invoke(app, ["eval", "--n", "1"]))
    for hint in ("out of memory", "--batch-size", "--dtype bfloat16", "--device-map auto"):
        assert hint in line, line
