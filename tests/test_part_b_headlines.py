"""Part B headlines are comparable with the papers: a change is measured at a layer chosen
on other items (a selection half) with a paired bootstrap interval, the default prefix
never names an item's own classes (oracles say so), and "present but not surfaced" comes
with its own chance level and a permutation baseline."""

import json

import numpy as np
import pytest

from vislens.experiments.perception import prefix as P
from vislens.experiments.perception import surface as S
from vislens.experiments.perception.artifacts import held_out_delta
from vislens.experiments.stats import selection_split


def _rows(condition, stats_per_item, classes):
    return [{"condition": condition, "task": "ref-seg", "item": str(i), "class": c,
             "stats": json.dumps(st)} for i, (st, c) in enumerate(zip(stats_per_item, classes))]


def test_headline_layer_is_chosen_on_the_selection_half_and_scored_on_the_other():
    classes = ["a", "b"] * 4
    sel, ev = selection_split(classes, seed=0)
    before = [{f"values/{ly}": {"free": 0.0, "oracle": 0.0} for ly in range(3)}
              for _ in classes]
    after = []
    for i in range(len(classes)):
        # layer 1 changes a lot on the selection half only; layer 2 a little, everywhere
        # more on the evaluation half: the max over layers on the evaluation items is layer 2
        l1 = 0.5 if i in sel else 0.0
        l2 = 0.1 if i in sel else 0.3
        after.append({"values/0": {"free": 0.0, "oracle": 0.0},
                      "values/1": {"free": l1, "oracle": l1},
                      "values/2": {"free": l2, "oracle": -l2}})
    rows = _rows("clean", before, classes) + _rows("prefix", after, classes)
    head = held_out_delta(rows, "clean", "prefix", ["ref-seg", "ref-seg-oracle"], seed=0,
                          n_boot=200)
    v = head["ref-seg"]["values"]
    assert v["layer"] == 1  # chosen where the SELECTION half changed most
    assert v["delta"] == 0.0 and v["ci95"] == [0.0, 0.0]  # ... and it does not hold up
    assert (v["n_select"], v["n_eval"]) == (4, 4) and v["before"] == v["after"] == 0.0
    assert head["ref-seg"]["metric"] == "miou"
    oracle = head["ref-seg-oracle"]["values"]
    assert oracle["layer"] == 1 and oracle["delta"] == 0.0  # |-0.1| < 0.5 on the selection
    # a real change everywhere is found and bracketed
    after2 = [{**a, "values/1": {"free": 0.0, "oracle": 0.0},
               "values/2": {"free": 0.3 + 0.1 * (i % 3), "oracle": 0.0}}
              for i, a in enumerate(after)]
    rows2 = _rows("clean", before, classes) + _rows("prefix", after2, classes)
    v2 = held_out_delta(rows2, "clean", "prefix", ["ref-seg"], seed=0)["ref-seg"]["values"]
    assert v2["layer"] == 2 and v2["ci95"][0] <= v2["delta"] <= v2["ci95"][1]
    assert v2["ci95"][0] > 0


def test_classes_prefix_is_the_data_sets_list_and_never_the_items():
    from vislens.data.resolve import open_task
    from vislens.data.shapesworld import SHAPES
    from vislens.experiments.perception.perceive import item_classes

    for task, data_task in (("fg-seg", "fewshot"), ("sem-seg", "semantic"),
                            ("ref-seg", "referring")):
        one = open_task(data_task, "shapesworld", 1)
        many = open_task(data_task, "shapesworld", 12)
        names, source = P.dataset_classes(task, "shapesworld", one)
        assert (names, source) == (list(SHAPES), "data set")
        assert P.dataset_classes(task, "shapesworld", many)[0] == names  # not the items'
        assert set(item_classes(task, one[0])) < set(names) or task == "ref-seg"
    voc = P.dataset_classes("fg-seg", "voc:/nowhere", [])[0]
    assert len(voc) == 20 and "background" not in voc


def test_a_long_class_list_is_cut_in_its_own_order_whatever_the_item():
    names = [f"class{i}" for i in range(50)]
    count = lambda text: len(text.split())  # noqa: E731 - one token per word
    kept = P.fit_classes(names, count, max_tokens=20)
    assert kept == names[:len(kept)] and count(P.render(kept)) <= 20
    assert count(P.render(names[:len(kept) + 1])) > 20  # the longest head that fits
    assert P.fit_classes(names, count, max_tokens=1000) == names
    assert P.fit_classes(names, count, max_tokens=1) == names[:1]  # never empty


def test_old_prefix_names_that_leak_the_answer_are_refused_with_their_oracle_name():
    for old, new in (("task", "task-oracle"), ("classes-present", "classes-oracle")):
        with pytest.raises(ValueError, match=new):
            P.check_prefix(old)
    assert P.is_oracle("task-oracle") and P.is_oracle("classes-oracle")
    assert not P.is_oracle("classes") and not P.is_oracle("some text")
    assert P.PrefixConfig().prefix == "classes"


def _surface_rows(truth, model, picked, n_choices=2):
    return [{"item": str(2 * i + 1), "truth": t, "n_choices": n_choices, "model": m,
             "mode": "generate", "readout": json.dumps({"values/0": p})}
            for i, (t, m, p) in enumerate(zip(truth, model, picked))] + \
           [{"item": str(2 * i), "truth": 0, "n_choices": n_choices, "model": 0,
             "mode": "generate", "readout": json.dumps({"values/0": 0})}
            for i in range(len(truth))]


def test_present_not_surfaced_has_its_chance_level_and_a_permutation_baseline():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 40).tolist()
    model = [1 - t if i % 4 else t for i, t in enumerate(truth)]  # right on a quarter
    config = S.SurfaceConfig(layers=(0,), n_permutations=500)
    coin = rng.integers(0, 2, 40).tolist()  # a readout that knows nothing
    s = S.summarise(_surface_rows(truth, model, coin), 1, config)
    assert s["present_not_surfaced_chance"] == pytest.approx(0.5 * 0.75)
    assert s["values_beat_chance"] is False
    perm = s["values_permutation"]
    assert perm["ci95"][0] < 0.5 < perm["ci95"][1] and perm["n_permutations"] == 500
    assert s["present_not_surfaced_permutation"]["mean"] == pytest.approx(0.375, abs=0.03)
    s2 = S.summarise(_surface_rows(truth, model, truth), 1, config)  # a perfect readout
    assert s2["values_beat_chance"] is True and s2["values_permutation"]["p_value"] < 0.01
    assert s2["present_not_surfaced"]["rate"] == 0.75
    assert s2["present_not_surfaced_permutation"]["p_value"] < 0.01
    again = S.summarise(_surface_rows(truth, model, coin), 1, config)
    assert again == s  # seeded
    other = S.summarise(_surface_rows(truth, model, coin), 1,
                        S.SurfaceConfig(layers=(0,), n_permutations=500, seed=1))
    assert other["values_permutation"] != s["values_permutation"] and other["seed"] == 1
