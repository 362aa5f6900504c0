"""The toys were trained on ShapesWorld world 0: every way in refuses it, as shapesworld:0
is refused, and the Python API's defaults are held-out worlds."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vislens.cli import app
from vislens.data import open_dataset, shapesworld, tasks
from vislens.data.coco import export_coco, load_coco
from vislens.data.world import write_world


def test_vislens_world_refuses_the_training_world(tmp_path):
    result = CliRunner().invoke(app, ["world", "--out", str(tmp_path / "w"), "--seed", "0"])
    assert result.exit_code == 2 and "trained on" in result.output
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="trained on"):
        write_world(tmp_path / "w", n=2, seed=0)


def test_a_coco_folder_exported_from_world_0_is_refused(tmp_path):
    export_coco(shapesworld.generate(2, seed=0), tmp_path / "w0")
    with pytest.raises(ValueError, match="world 0.*trained on"):
        open_dataset(f"coco:{tmp_path / 'w0'}")
    # the folder carries its world seed: refused even with the images' own meta stripped
    summary = write_world(tmp_path / "w1", n=2, seed=1001)
    ann = tmp_path / "w1" / "annotations.json"
    data = json.loads(ann.read_text())
    assert summary["seed"] == 1001 and data["info"]["vislens_world"] == 1001
    assert len(load_coco(tmp_path / "w1")) == 2
    data["info"]["vislens_world"] = 0
    for img in data["images"]:
        img.pop("vislens_meta")
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="world 0"):
        load_coco(tmp_path / "w1")


def test_python_api_defaults_are_held_out(tmp_path):
    held = shapesworld.HELD_OUT_SEED
    assert held not in shapesworld.TRAINING_SEEDS
    assert shapesworld.generate(1)[0].meta["seed"] == held
    assert write_world(tmp_path / "w", n=1)["seed"] == held
    assert tasks.semantic_maps(1)[0].sample.meta["seed"] == held
    assert tasks.referring_expressions(1)[0].sample.meta["seed"] == held
    assert tasks.few_shot_episodes(1)[0].support[0].meta["seed"] == held
    assert tasks.cosegmentation_sets(1)[0].samples[0].meta["seed"] == held
    assert tasks.correspondence_pairs(1)[0].id.startswith(f"corr-{held}-")
    assert tasks.videos(1, frames=2)[0].meta["seed"] == held
    assert f"-{held}-" in tasks.multiple_choice(1)[0].id
