"""Liu et al. B3: a short text BEFORE the image, and what it does to perception.

Image tokens come before the text in these causal LMs, so their keys / values can
only be changed by text placed ahead of them. The same items are scored twice,
without and with the prefix, and the change is reported per task and layer. The
projector and vision-encoder baselines cannot change (they never see the text).

Prefixes (`PrefixConfig.prefix`):
- "classes" (the default): the DATA SET's class list, the same text for every item of
  a task, so it cannot name an item's answer: "classes : circle , square , ... ." The
  list is the data set's own (ShapesWorld: its shapes; VOC: its 20 classes; SPair-71k:
  its 18 categories; ImageNet-S / VOC semantic maps: the classes the maps carry), in the
  data set's own order. Where a data set has no class list (RefCOCO, DAVIS, ...) the
  sorted union of the classes of every loaded item is used (`classes_source = "items"`).
  Rule when it is too long: the list is cut to the first classes, in that fixed order,
  whose rendered text fits in `max_prefix_tokens` tokens of the model's tokenizer; the
  cut never looks at an item, so an item's classes are not favoured.
- "classes-oracle": only the classes present in the item (leaks the answer);
- "task-oracle": the task in words, which names the item's class / expression;
- any other text: used as written, the same for every item.
Oracle runs say so: `oracle: true` and their headline is `oracle_headline`.

Headline: per task, the change of the values' score at ONE layer, chosen on a selection
half of the items (stratified by class, seeded) as the layer of the largest change
(sign kept), then measured on the other half with a paired bootstrap interval over
items (artifacts.held_out_delta). The per-layer `delta` curves are on all items, and
their largest entry is not a held-out number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypedDict, cast

from vislens.experiments.perception import perceive
from vislens.experiments.perception.artifacts import HeldOutTask, delta, held_out_delta
from vislens.runs.handle import ModelHandle
from vislens.runs.local import executor

# option -> what perceive.prefix_text calls it; an oracle names the item's answer
ORACLE_PREFIXES = {"classes-oracle": "classes-present", "task-oracle": "task"}
RENAMED = {"task": "task-oracle", "classes-present": "classes-oracle"}
# SPair-71k's categories (its PairAnnotation files name one per pair)
SPAIR_CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                    "chair", "cow", "dog", "horse", "motorbike", "person", "pottedplant",
                    "sheep", "train", "tvmonitor")


@dataclass
class PrefixConfig:
    perceive: perceive.PerceiveConfig = field(default_factory=perceive.PerceiveConfig)
    prefix: str = "classes"  # "classes" | "classes-oracle" | "task-oracle" | literal text
    max_prefix_tokens: int = 64  # the "classes" list is cut to fit (see the module doc)
    n_boot: int = 1000  # bootstrap draws of every headline interval

    def to_dict(self) -> dict:
        return asdict(self)


def check_prefix(prefix: str) -> str:
    if not prefix or not prefix.strip():
        raise ValueError("--prefix is empty; give 'classes', 'classes-oracle', 'task-oracle' "
                         "or some text")
    if prefix in RENAMED:
        raise ValueError(f"--prefix {prefix} names the item's answer; it is now "
                         f"--prefix {RENAMED[prefix]} (reported as an oracle)")
    return prefix


def as_prefix_config(config) -> PrefixConfig:
    """A PrefixConfig, or a PerceiveConfig whose `prefix` says which (older callers)."""
    if isinstance(config, PrefixConfig):
        return config
    return PrefixConfig(perceive=replace(config, prefix=None),
                        prefix=config.prefix or "classes")


def is_oracle(prefix: str) -> bool:
    return prefix in ORACLE_PREFIXES


def dataset_classes(task: str, spec: str, items: Sequence) -> tuple[list[str], str]:
    """The class list of the data set a task reads, in the data set's own order, and where
    it came from ("data set", or "items" where the data set has no list of its own)."""
    kind = spec.partition(":")[0].strip().lower()
    if kind == "shapesworld":
        from vislens.data.tasks import classes

        return classes("shape"), "data set"
    if task == "sem-seg" and items:  # semantic maps carry their data set's whole list
        return list(items[0].classes[1:]), "data set"
    if kind == "voc":
        from vislens.data.voc import VOC_CLASSES

        return [c for c in VOC_CLASSES if c != "background"], "data set"
    if kind == "spair":
        return list(SPAIR_CATEGORIES), "data set"
    names = sorted({n for it in items for n in perceive.item_classes(task, it)})
    return names, "items"


def render(names: Sequence[str]) -> str:
    return "classes : " + " , ".join(dict.fromkeys(names or ["object"])) + " ."


def fit_classes(names: Sequence[str], count: Callable[[str], int], max_tokens: int
                ) -> list[str]:
    """The longest head of `names` (fixed order) whose rendered prefix has at most
    `max_tokens` tokens (at least one class)."""
    names = list(dict.fromkeys(names))
    lo, hi = 1, len(names)
    if not names or count(render(names)) <= max_tokens:
        return names
    while lo < hi:  # the token count grows with the number of names listed
        mid = (lo + hi + 1) // 2
        if count(render(names[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return names[:lo]


def _counter(vlm, texts: list[str]) -> list[int]:
    return [len(vlm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def class_prefixes(vlm: ModelHandle, config: PrefixConfig, items: dict[str, list]
                   ) -> dict[str, dict]:
    """Per task: the "classes" prefix text and how it was made."""
    ex = executor(vlm)
    cache: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in cache:
            cache[text] = ex.call(_counter, [text])[0]
        return cache[text]

    out = {}
    for task, todo in items.items():
        spec = config.perceive.data.get(task, config.perceive.data.get("*", "shapesworld"))
        names, source = dataset_classes(task, spec, todo)
        kept = fit_classes(names, count, config.max_prefix_tokens)
        text = render(kept)
        out[task] = {"text": text, "classes_listed": len(kept), "classes_total": len(names),
                     "truncated": len(kept) < len(names), "classes_source": source,
                     "tokens": count(text), "max_prefix_tokens": config.max_prefix_tokens}
    return out


class _PrefixHeadline(TypedDict, total=False):
    headline: dict[str, HeldOutTask]  # task -> held-out change (a prefix naming no answer)
    oracle_headline: dict[str, HeldOutTask]  # the same, when the prefix is an oracle


class PrefixSummary(_PrefixHeadline):
    """summary.json of `vislens prefix` (what `execute` returns): `run`'s keys, then
    `execute`'s (plots). Exactly one of headline / oracle_headline, as `oracle` says. Read
    by report/sections.py `prefix_section` and experiments/study.py `_headline`;
    tests/test_summary_contract.py checks both against these keys."""

    prefix: str  # the --prefix option
    oracle: bool  # the prefix names the item's answer
    prefix_text: dict[str, dict[str, Any]]  # task -> the text put before the image, and why
    clean: dict[str, perceive.TaskEntry]
    prefixed: dict[str, perceive.TaskEntry]
    delta: dict[str, dict[str, Any]]  # task -> prefixed - clean per layer
    plots: list[str]  # clean vs prefixed curves, one per task


def run(vlm: ModelHandle, config, out, progress: Callable | None = None) -> dict:
    config = as_prefix_config(config)
    prefix = check_prefix(config.prefix)
    pcfg = replace(config.perceive, prefix=None)
    tasks = perceive.check_tasks(pcfg.tasks)
    items = {t: perceive.load_items(t, pcfg) for t in tasks}
    clean = perceive.run(vlm, pcfg, out, progress, condition="clean", items=items)
    texts: dict[str, dict] = {}
    if prefix == "classes":
        texts = class_prefixes(vlm, config, items)
        prefixed: dict = {}
        for text in dict.fromkeys(v["text"] for v in texts.values()):  # one run per text
            group = tuple(t for t in tasks if texts[t]["text"] == text)
            prefixed.update(perceive.run(vlm, replace(pcfg, tasks=group, prefix=text), out,
                                         progress, condition="prefix", items=items))
        prefixed = {k: prefixed[k] for k in clean if k in prefixed}  # clean's task order
    else:
        literal = ORACLE_PREFIXES.get(prefix, prefix)
        prefixed = perceive.run(vlm, replace(pcfg, prefix=literal), out, progress,
                                condition="prefix", items=items)
        texts = {t: {"text": "(per item: names its classes)" if is_oracle(prefix) else prefix}
                 for t in tasks}
    oracle = is_oracle(prefix)
    head = held_out_delta(out.rows(), "clean", "prefix", clean, seed=pcfg.seed,
                          n_boot=config.n_boot)
    return {"prefix": prefix, "oracle": oracle, "prefix_text": texts,
            "clean": clean, "prefixed": prefixed, "delta": delta(clean, prefixed),
            ("oracle_headline" if oracle else "headline"): head}


def execute(vlm: ModelHandle, config, out, meta: dict,
            progress: Callable | None = None) -> PrefixSummary:
    """Run into directory `out` (resuming), plot clean vs prefixed, write summary.json."""
    from vislens.experiments.perception.plots import compare_curves
    from vislens.runs.rundir import RunDir

    config = as_prefix_config(config)
    run_dir = RunDir(out, {"experiment": "prefix", **meta, **asdict(config)},
                     key=["condition", "task", "item"])
    summary = cast(PrefixSummary, run(vlm, config, run_dir, progress))
    summary["plots"] = [str(p) for p in compare_curves(
        summary["clean"], summary["prefixed"], run_dir.path, ("clean", "prefix"))]
    run_dir.write_summary(summary)
    return summary
