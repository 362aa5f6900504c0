"""The selection funnel: every command that selects images reports, per setting, how many
images were read, selected, answered right clean, passed the noise filter and were kept,
and says in one line where a setting lost them all."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vislens.cli import app
from vislens.experiments import funnel

runner = CliRunner()


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    """30 ShapesWorld scenes of world 3 exported as COCO by `vislens world`: one image passes
    the small-target selection; the toy answers its polling question right, and still does
    with the object noised, so polling keeps nothing."""
    out = tmp_path_factory.mktemp("w") / "world3"
    result = runner.invoke(app, ["world", "--out", str(out), "--n", "30", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out


def test_ablate_on_an_exported_world_says_where_polling_lost_its_image(world3, tmp_path):
    out = tmp_path / "ablate"
    args = ["ablate", "--data", f"coco:{world3}", "--n", "30", "--conditions", "object",
            "--out", str(out)]
    result = runner.invoke(app, args, terminal_width=400)
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "summary.json").read_text())["funnel"]["counts"]
    assert counts["polling"] == {"read": 30, "selected": 1, "region": None, "clean_correct": 1,
                                 "noise_filter": 0, "kept": 0}
    assert counts["generative"]["kept"] == 1 and counts["vqa"]["region"] == 1
    lost = [line for line in result.output.splitlines() if "no image kept" in line]
    assert len(lost) == 1 and lost[0].startswith("polling:")
    assert "noise" in lost[0] and "--n" in lost[0]
    assert "images, polling: 30 read -> 1 passed the selection" in result.output


def test_knockout_and_lens_report_their_funnel(world3, tmp_path):
    ko = runner.invoke(app, ["knockout", "--data", f"coco:{world3}", "--n", "30", "--settings",
                             "polling", "--conditions", "object->last", "--window", "4",
                             "--stride", "4", "--out", str(tmp_path / "ko"), "--json"])
    assert ko.exit_code == 0, ko.output
    counts = json.loads(ko.stdout)["funnel"]["counts"]["polling"]
    assert counts["read"] == 30 and counts["selected"] == 1 and counts["noise_filter"] is None
    assert counts["kept"] == counts["clean_correct"]
    lens = runner.invoke(app, ["logit-lens", "--n", "6", "--viewers", "0",
                               "--out", str(tmp_path / "lens"), "--json"])
    assert lens.exit_code == 0, lens.output
    f = json.loads(lens.stdout)["funnel"]
    assert f["counts"]["lens"]["read"] == 6
    assert f["counts"]["lens"]["kept"] == f["counts"]["lens"]["selected"] > 0


def test_tally_counts_each_step_and_names_the_first_empty_one():
    rows = [
        {"setting": "vqa", "condition": "clean", "correct": False, "kept": False,
         "skipped": funnel.SKIPPED_REGION},
        {"setting": "vqa", "condition": "clean", "correct": True, "kept": True},
        {"setting": "vqa", "condition": "object", "correct": False, "kept": True},
        {"setting": "polling", "condition": "clean", "correct": False, "kept": False},
    ]

    class Read(list):
        read = 50

    f = funnel.tally(Read([1, 2, 3]), [0, 1, None], rows, ("vqa", "polling"), noise=True)
    assert f["counts"]["vqa"] == {"read": 50, "selected": 2, "region": 1, "clean_correct": 1,
                                  "noise_filter": 1, "kept": 1}
    assert f["counts"]["polling"]["clean_correct"] == 0 and "vqa" not in f["lost"]
    assert "answered right clean" in f["lost"]["polling"] and "--model" in f["lost"]["polling"]
    nothing = funnel.tally([1, 2], [None, None], None, ("lens",))
    assert "--area" in nothing["lost"]["lens"]
