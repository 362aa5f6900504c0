"""The real path end to end: a LLaVA-1.5-shaped checkpoint directory (336 px, 24x24
tokens, tiny random weights) and COCO-format data, through the CLI."""

import json

import pytest
from helpers_models import save
from typer.testing import CliRunner

from vislens.cli import app
from vislens.data import shapesworld
from vislens.data.coco import export_coco

runner = CliRunner()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    model = save("llava", root / "llava-1.5-shaped")
    data = export_coco(shapesworld.generate(3, seed=5, size=336), root / "coco")
    return model, data


def test_info_logit_lens_and_knockout_on_a_llava15_shaped_directory(paths, tmp_path):
    model, data = paths
    info = runner.invoke(app, ["info", "--model", str(model), "--json"])
    assert info.exit_code == 0, info.output
    facts = json.loads(info.stdout)
    assert facts["family"] == "llava"
    assert facts["image_tokens_for"]["640x480 (photo)"]["image_tokens"] == 576
    lens = runner.invoke(app, ["logit-lens", "--model", str(model), "--data", f"coco:{data}",
                               "--area", "0:", "--out", str(tmp_path / "lens"), "--json"])
    assert lens.exit_code == 0, lens.output
    summary = json.loads(lens.stdout)
    assert summary["n_images"] >= 1 and summary["n_layers"] == facts["layers"] + 1
    assert summary["viewer"]
    ko = runner.invoke(app, ["knockout", "--model", str(model), "--data", f"coco:{data}",
                             "--area", "0:", "--out", str(tmp_path / "ko"), "--json"])
    assert ko.exit_code == 0, ko.output
    assert json.loads(ko.stdout)["windows"][-1] == [0, facts["layers"] - 1]
    ab = runner.invoke(app, ["ablate", "--model", str(model), "--data", f"coco:{data}",
                             "--area", "0:", "--settings", "polling", "--out",
                             str(tmp_path / "ab"), "--json"])
    assert ab.exit_code == 0, ab.output
    assert set(json.loads(ab.stdout)["n_kept"]) == {"polling"}
