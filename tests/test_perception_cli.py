"""The four part-B commands end to end on a tiny untrained toy: JSON shape, files,
resume, one-line errors, and a native-format data set (a VOC fixture)."""

import json

import pytest
import typer
from native_formats import write_blink, write_voc
from typer.testing import CliRunner

from vislens.cli import COMMANDS, model_options
from vislens.data import tasks as shapes_tasks
from vislens.models.vlm import VLM
from vislens.toy.build import ToySpec, build_model, build_processor

TINY = ToySpec(vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, lm_hidden=32,
               lm_layers=2, lm_heads=2, lm_mlp=64)
TASK_NAMES = ["fg-seg", "co-seg", "co-seg-oracle", "sem-seg", "sem-seg-oracle", "ref-seg",
              "ref-seg-oracle", "sem-corr", "temp-corr"]


@pytest.fixture()
def app(monkeypatch):
    tiny = VLM(build_model(TINY).eval(), build_processor(TINY), "llava", name="tiny")
    monkeypatch.setattr(model_options, "load_model", lambda model, device, dtype, **where: tiny)
    app = typer.Typer(pretty_exceptions_enable=False)
    for name in ("perceive", "prefix", "artifacts", "surface"):
        app.command(name)(COMMANDS[name])
    return app


def invoke(app, *args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.mark.slow
def test_perceive_json_files_and_resume(app, tmp_path):
    out = tmp_path / "run"
    r = invoke(app, "perceive", "--n", 1, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert list(summary["tasks"]) == TASK_NAMES
    for task, entry in summary["tasks"].items():
        assert len(entry["keys"]) == len(entry["values"]) == 2
        assert set(entry) >= {"metric", "keys", "values", "projector", "vision"}
        assert (out / f"{task}.png").is_file()
        assert entry["upper_bound"]["values"]["layer"] in (0, 1)
        vals = [v for v in entry["keys"] + entry["values"] + [entry["projector"]]
                if v is not None]
        assert all(0.0 <= v <= 1.0 for v in vals)
    assert summary["tasks"]["sem-seg"]["vision"] is None  # no text side in the vision tower
    assert json.loads((out / "summary.json").read_text()) == summary
    again = invoke(app, "perceive", "--n", 1, "--out", out, "--json")
    assert json.loads(again.stdout) == summary  # resumed: nothing recomputed, same numbers


@pytest.mark.slow
def test_perceive_reports_counts_chance_levels_and_the_oracle_option(app, tmp_path):
    r = invoke(app, "perceive", "--tasks", "fg-seg,sem-seg", "--n", 3, "--layers", "1",
               "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.output
    tasks = json.loads(r.stdout)["tasks"]
    assert list(tasks) == ["fg-seg", "sem-seg", "sem-seg-oracle"]
    for e in tasks.values():
        assert e["level"] == "pixel" and e["token_level"]["level"] == "token"
        assert e["n_selection"] + e["n_heldout"] == e["n"] == 3 and e["n_heldout"] >= 1
        assert sorted(e["split"]["selection"] + e["split"]["heldout"]) == ["0", "1", "2"]
    assert set(tasks["sem-seg"]["chance"]) == {"all-background", "random-class"}
    assert tasks["fg-seg"]["chance"]["all-background"] == 0.0
    r = invoke(app, "perceive", "--tasks", "sem-seg", "--n", 1, "--layers", "1",
               "--no-sem-seg-oracle", "--out", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    assert list(json.loads(r.stdout)["tasks"]) == ["sem-seg"]


def test_perceive_errors_are_one_line(app, tmp_path):
    r = invoke(app, "perceive", "--tasks", "fg-seg,nope", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "unknown task" in r.output
    r = invoke(app, "perceive", "--layers", "0,9", "--out", tmp_path / "y")
    assert r.exit_code == 2 and "out of range" in r.output
    r = invoke(app, "perceive", "--data", "segm=voc:/x", "--out", tmp_path / "z")
    assert r.exit_code == 2 and "unknown part" in r.output
    r = invoke(app, "perceive", "--similarity", "l2", "--out", tmp_path / "w")
    assert r.exit_code == 2 and "unknown similarity" in r.output
    r = invoke(app, "perceive", "--text-token", "first", "--out", tmp_path / "v")
    assert r.exit_code == 2 and "unknown text token" in r.output
    assert not (tmp_path / "w").exists() and not (tmp_path / "v").exists()


def test_perceive_reads_a_native_voc_fixture(app, tmp_path):
    root = tmp_path / "VOC2012"
    write_voc(root, shapes_tasks.semantic_maps(2, seed=3))
    r = invoke(app, "perceive", "--tasks", "sem-seg", "--data", f"sem-seg=voc:{root}",
               "--n", 2, "--layers", "1", "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    entry = json.loads(r.stdout)["tasks"]["sem-seg"]
    assert entry["n"] == 2 and entry["layers"] == [1] and entry["values"][0] is not None


def test_prefix_reports_change(app, tmp_path):
    r = invoke(app, "prefix", "--prefix", "classes", "--tasks", "ref-seg,sem-corr", "--n", 1,
               "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert set(s["delta"]) == {"ref-seg", "ref-seg-oracle", "sem-corr"}
    d = s["delta"]["sem-corr"]
    assert d["projector"] == 0 and d["vision"] == 0  # baselines never see the text
    assert (tmp_path / "run" / "sem-corr-prefix.png").is_file()


@pytest.mark.slow
def test_prefix_default_is_the_data_sets_classes_with_a_held_out_headline(app, tmp_path):
    from vislens.data.shapesworld import SHAPES

    r = invoke(app, "prefix", "--tasks", "ref-seg,fg-seg", "--n", 2, "--out", tmp_path / "run",
               "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["prefix"] == "classes" and s["oracle"] is False and "oracle_headline" not in s
    for task in ("ref-seg", "fg-seg"):  # the same text whatever the item: every shape
        made = s["prefix_text"][task]
        assert made["text"] == "classes : " + " , ".join(SHAPES) + " ."
        assert made["classes_listed"] == made["classes_total"] == len(SHAPES)
        assert made["classes_source"] == "data set" and not made["truncated"]
    for task in ("ref-seg", "ref-seg-oracle", "fg-seg"):
        head = s["headline"][task]["values"]
        assert head["n_select"] + head["n_eval"] == 2 and head["n_eval"] == 1
        assert head["layer"] in (0, 1) and "ci95" in head
    r = invoke(app, "prefix", "--tasks", "fg-seg", "--n", 1, "--max-prefix-tokens", 6,
               "--out", tmp_path / "short", "--json")
    made = json.loads(r.stdout)["prefix_text"]["fg-seg"]
    assert made["truncated"] and made["tokens"] <= 6
    assert made["text"].startswith(f"classes : {SHAPES[0]}")  # the data set's order


def test_prefixes_naming_the_answer_are_labelled_oracles(app, tmp_path):
    r = invoke(app, "prefix", "--prefix", "classes-oracle", "--tasks", "fg-seg", "--n", 2,
               "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["oracle"] is True and "oracle_headline" in s and "headline" not in s
    r = invoke(app, "prefix", "--prefix", "task", "--tasks", "fg-seg", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "task-oracle" in r.output


def test_surface_says_whether_the_values_beat_chance(app, tmp_path):
    r = CliRunner().invoke(app, ["surface", "--n", "4", "--seed", "3", "--out",
                                 str(tmp_path / "surf")], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "chance" in r.output and ("does NOT beat chance" in r.output
                                     or "beats chance" in r.output)
    s = json.loads((tmp_path / "surf" / "summary.json").read_text())
    assert s["seed"] == 3 and isinstance(s["values_beat_chance"], bool)
    model_acc = s["model_accuracy"]["rate"]
    assert s["present_not_surfaced_chance"] == pytest.approx(0.5 * (1 - model_acc))


def test_artifacts_and_surface(app, tmp_path):  # over 1 s, but the one run of `artifacts` here
    r = invoke(app, "artifacts", "--n", 1, "--n-images", 3, "--z", 0, "--min-score", 0.0,
               "--out", tmp_path / "art", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert set(s["perceive"]["delta"]) == {"sem-seg", "sem-seg-oracle", "ref-seg",
                                           "ref-seg-oracle"}
    assert sum(s["n_flagged"].values()) > 0  # z 0, min-score 0: above-mean positions
    mc = s["multiple_choice"]
    assert mc["chance_accuracy"] == 0.5 and len(mc["delta_ci95"]) == 2 and mc["n"] == 1
    for task in ("sem-seg", "ref-seg"):  # n 1: held out, nothing to choose a layer on
        assert s["perceive"]["headline"][task]["values"]["n_select"] == 0
        assert s["perceive"]["headline"][task]["values"]["n_eval"] == 1
        assert s["perceive"]["headline"][task]["values"]["layer"] is None
    assert (tmp_path / "art" / "artifacts.png").is_file()
    scores = json.loads((tmp_path / "art" / "scores.json").read_text())
    assert len(scores["scores"]["0"]) == 144
    r = invoke(app, "surface", "--n", 4, "--seed", 1, "--out", tmp_path / "surf", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["n_scored"] == 2 and s["values_permutation"]["n_permutations"] == 1000
    assert (tmp_path / "surf" / "surface.png").is_file()
    assert sum(s[k] for k in ("solved_by_values_not_model", "solved_by_model_not_values",
                              "both", "neither")) == 2


def test_surface_reads_a_blink_fixture(app, tmp_path):
    path = write_blink(tmp_path / "art_style.parquet",
                       shapes_tasks.multiple_choice(4, seed=9, kind="fill"))
    r = invoke(app, "surface", "--data", f"blink:{path}", "--n", 4, "--layers", "1",
               "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["n_items"] == 4 and s["best_layer"] == 1


def test_tables_fit_80_columns_with_labelled_layers(app, tmp_path):
    r = CliRunner().invoke(app, ["perceive", "--n", "2", "--tasks", "co-seg,sem-seg,sem-corr",
                                 "--out", str(tmp_path / "run")], terminal_width=80,
                           env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout  # no header or value cut short
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    assert "L0" in r.stdout and "L1" in r.stdout and "projector" in r.stdout
    assert "chance" in r.stdout and "sem-seg-oracle" in r.stdout and " L" in r.stdout


def test_prefix_section_shows_every_task_and_the_held_out_headline(tmp_path):
    """The report's prefix table is the held-out headline (layer chosen on the selection
    half, change on the other, with its interval and counts), never the largest change
    over layers on the items it reports."""
    from vislens.report.sections import prefix_section

    delta = {t: {"metric": "miou", "values": [0.0, -0.12, 0.05], "keys": [0.0, 0.0, 0.0]}
             for t in ("fg-seg", "ref-seg")}
    headline = {t: {"metric": "miou", "values": {
        "layer": 2, "delta": 0.03, "ci95": [-0.01, 0.07], "before": 0.4, "after": 0.43,
        "n_select": 5, "n_eval": 4}} for t in delta}
    plots = [tmp_path / f"{t}-prefix.png" for t in delta]
    for p in plots:
        p.write_bytes(b"png")
    section = prefix_section({"prefix": "classes", "delta": delta, "prefixed": {},
                              "headline": headline, "plots": [str(p) for p in plots]})
    assert len(section.images) == len(delta)  # every task, not the first three
    assert all("prefix" not in caption.split(":")[0] for caption, _ in section.images)
    rows = section.tables[0].rows
    assert [r[0] for r in rows] == ["fg-seg", "ref-seg"]
    assert [r[2] for r in rows] == [2, 2] and [r[5] for r in rows] == [0.03, 0.03]
    assert rows[0][6] == "-0.010 to +0.070" and rows[0][7] == "5 / 4"
    oracle = prefix_section({"prefix": "classes-oracle", "oracle": True, "delta": delta,
                             "prefixed": {}, "oracle_headline": headline})
    assert "ORACLE" in oracle.intro and len(oracle.tables[0].rows) == 2

