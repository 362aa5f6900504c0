"""`vislens study`: every experiment with sensible defaults, one report.

Each step writes its own run directory under the study directory (so a rerun
resumes every step); run_study returns their summaries, from which
vislens.report.study rebuilds the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vislens.runs.handle import ModelHandle
from vislens.runs.rundir import write_json_atomic

if TYPE_CHECKING:
    from vislens.experiments.accuracy import AccuracySummary


@dataclass
class StudyConfig:
    model: str = "toy"
    data: str = "shapesworld:1000"
    scale: float = 1.0  # multiplies every step's sample count
    seed: int = 0
    device: str = "cpu"
    device_map: str | None = None  # accelerate's, over several GPUs (replaces device)
    max_memory: str | None = None  # with device_map: "0=70GiB,1=70GiB,cpu=200GiB"
    dtype: str | None = None
    workers: int = 0  # Ray workers, one model each (0 = this process only)
    ray: str | None = None  # address of a Ray cluster to run them on

    def n(self, base: int) -> int:
        return max(2, round(base * self.scale))


@dataclass
class StudyRun:
    """What a study ran: each step's summary (by step name, in order), seconds per step
    summed over every invocation of the study, and the facts its report opens with."""

    model: str
    facts: dict[str, object]
    summaries: dict[str, dict]
    seconds: dict[str, float]

    def headlines(self) -> dict[str, dict]:
        """Per step, the few numbers a person looks at first."""
        return {k: _headline(k, v) for k, v in self.summaries.items()}


class StepClock:
    """Seconds per study step, summed over every invocation of the study (a resumed run's
    report shows what the whole study cost, not its last, mostly-cached pass); kept in
    timing.json and updated even when a step is interrupted."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = {}
        if path.is_file():
            self.seconds = {k: float(v) for k, v in json.loads(path.read_text()).items()}

    @contextmanager
    def step(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
            write_json_atomic(self.path, self.seconds)

    def totals(self) -> dict[str, float]:
        steps = {k: v for k, v in self.seconds.items() if k != "total"}
        return {**steps, "total": sum(steps.values())}


def run_study(config: StudyConfig, out: Path, progress=None,
              log: Callable[[str], None] = print) -> StudyRun:
    from vislens.data import open_dataset
    from vislens.runs.ray_pool import Models

    out = Path(out)
    kind = config.data.partition(":")[0]
    if kind != "shapesworld":
        raise ValueError("study runs on ShapesWorld (questions need its ground truth); run "
                         "ablate / logit-lens / knockout with --data coco:DIR for COCO")
    samples = open_dataset(config.data, n=config.n(120))  # checks the world is held out
    models = Models(config.workers, config.ray)
    start = time.perf_counter()
    try:
        # the model in this process, or a pool of Ray workers every step shares out to
        where = {"device_map": config.device_map, "max_memory": config.max_memory} \
            if config.device_map else {}
        vlm = models.load(config.model, device=config.device, dtype=config.dtype, **where)
        return _steps(vlm, config, samples, out, time.perf_counter() - start, progress, log)
    finally:
        models.close()


def _steps(vlm: ModelHandle, config: StudyConfig, samples, out: Path, loaded: float, progress,
           log) -> StudyRun:
    from vislens.experiments import ablation, attention, knockout, logit_lens, patching

    out.mkdir(parents=True, exist_ok=True)
    clock = StepClock(out / "timing.json")
    clock.seconds["load model"] = clock.seconds.get("load model", 0.0) + loaded
    meta = {"model": config.model, "data": config.data, "device": config.device,
            "dtype": config.dtype}
    # step -> its summary (each step's own type: the `*Summary` its section function takes)
    summaries: dict[str, Any] = {}

    def step(name: str, fn: Callable[[], Any]) -> None:
        log(f"study: {name} ...")
        t = time.perf_counter()
        with clock.step(name):
            summaries[name] = fn()
        log(f"study: {name} done in {time.perf_counter() - t:.0f} s")

    seed = samples[0].meta.get("seed", 1000)
    step("accuracy", lambda: _accuracy(vlm, config, seed, out / "accuracy.json", progress))
    small, large = (0.0, 350.0), (350.0, float("inf"))
    step("ablation", lambda: ablation.execute(
        vlm, samples, ablation.AblationConfig(area=small, seed=config.seed),
        out / "ablate", {**meta, "n": len(samples)}, progress=progress))
    step("logit lens", lambda: logit_lens.execute(
        vlm, samples[: config.n(40)], logit_lens.LensConfig(area=large, seed=config.seed),
        out / "logit-lens", {**meta, "n": config.n(40)}, progress=progress))
    step("knockout", lambda: knockout.execute(
        vlm, samples[: config.n(80)], knockout.KnockoutConfig(area=small, seed=config.seed),
        out / "knockout", {**meta, "n": config.n(80)}, progress=progress))
    step("patch", lambda: patching.execute(
        vlm, samples[: config.n(8)], patching.PatchConfig(area=small, seed=config.seed, maps=2),
        out / "patch", {**meta, "n": config.n(8)}, progress=progress))
    step("attention", lambda: attention.execute(
        vlm, samples[: config.n(24)], attention.AttentionConfig(area=large, viewers=2,
                                                                seed=config.seed),
        out / "attention", {**meta, "n": config.n(24)}, progress=progress))
    part_b(vlm, config, out, step, progress)
    times = clock.totals()
    facts = {"model": config.model, "data": config.data, "family": vlm.model_type,
             "LM layers": vlm.num_layers, "device": config.device,
             "total time (s), all runs of this study": round(times["total"], 1)}
    return StudyRun(config.model, facts, summaries, times)


def _accuracy(vlm: ModelHandle, config: StudyConfig, seed: int, path: Path, progress) -> dict:
    """Accuracy on fresh held-out scenes, kept in accuracy.json so a rerun reuses it."""
    from vislens.data import shapesworld
    from vislens.runs.local import executor

    key = {"model": config.model, "seed": seed, "n": config.n(60), "dtype": config.dtype}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["result"]
    scenes = shapesworld.generate(key["n"], seed=seed)
    result = {"seed": seed, **executor(vlm).call(_evaluate, scenes, progress=progress)}
    write_json_atomic(path, {"key": key, "result": result})
    return result


def _evaluate(vlm, scenes, progress=None) -> AccuracySummary:
    from vislens.experiments.accuracy import evaluate

    return evaluate(vlm.model, vlm.processor, scenes, progress=progress)


def part_b(vlm: ModelHandle, config: StudyConfig, out: Path, step, progress) -> None:
    """Liu et al.'s experiments on ShapesWorld task variants of the study's (held-out) world."""
    from vislens.experiments.perception import artifacts, perceive, prefix, surface

    data = {"*": config.data}
    meta = {"model": config.model, "num_layers": vlm.num_layers}
    pcfg = perceive.PerceiveConfig(data=data, n=config.n(8), seed=config.seed)
    step("perceive", lambda: perceive.execute(vlm, pcfg, out / "perceive", meta, progress))
    mc = surface.SurfaceConfig(data=data["*"], n=config.n(24), kind="fill")
    acfg = artifacts.ArtifactsConfig(
        data=data["*"], n_images=config.n(24), perceive=perceive.PerceiveConfig(
            tasks=("sem-seg", "ref-seg"), data=data, n=config.n(6), seed=config.seed),
        mc=surface.SurfaceConfig(data=data["*"], n=config.n(12), kind="fill"))
    step("artifacts", lambda: artifacts.execute(vlm, acfg, out / "artifacts", meta, progress))
    xcfg = perceive.PerceiveConfig(data=data, n=config.n(6), seed=config.seed,
                                   prefix="classes")
    step("prefix", lambda: prefix.execute(vlm, xcfg, out / "prefix", meta, progress))
    step("surface", lambda: surface.execute(vlm, mc, out / "surface", meta, progress))


def _headline(name: str, summary: dict) -> dict:
    """The few numbers a person looks at first (the full summaries are in each run dir)."""
    if name == "accuracy":
        return summary["accuracy"]
    if name == "ablation":
        return {"n_kept": summary["n_kept"], "drop": summary["drop"],
                "funnel": summary.get("funnel"), "reference": summary.get("reference")}
    if name == "logit lens":
        return {k: summary.get(k) for k in ("hit_rate", "peak_layer_mean", "background_rate",
                                            "funnel")}
    if name == "knockout":
        return {"windows": summary["window_labels"],
                "relative_accuracy": summary["relative_accuracy"],
                "relative_accuracy_first_token": summary.get("relative_accuracy_first_token"),
                "funnel": summary.get("funnel")}
    if name == "patch":
        return {"n_pairs": summary["n_pairs"], "layers": summary["layers"],
                "restored_residual": {g: c["mean"] for g, c in
                                      summary["restored"].get("residual", {}).items()},
                "attribution_spearman": {x: a["spearman"] for x, a in
                                         summary["attribution"].get("residual", {}).items()},
                "funnel": summary.get("funnel")}
    if name == "attention":
        return {k: summary[k] for k in ("peak_layer_image", "peak_layer_object",
                                        "object_lift")}
    if name == "perceive":
        return {t: {"metric": e["metric"], "values_held_out": e["selected"].get("values"),
                    "projector": e.get("projector"), "vision": e.get("vision"),
                    "chance": e.get("chance"), "n_heldout": e.get("n_heldout")}
                for t, e in summary["tasks"].items()}
    if name == "surface":
        return {**{k: summary[k]["rate"] for k in ("values_accuracy", "model_accuracy",
                                                   "present_not_surfaced")},
                **{k: summary.get(k) for k in ("present_not_surfaced_chance",
                                               "values_beat_chance", "n_scored")}}
    if name == "prefix":
        return summary.get("oracle_headline" if summary.get("oracle") else "headline") or {}
    if name == "artifacts":
        return summary["perceive"].get("headline") or {}
    return {}
