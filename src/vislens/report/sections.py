"""Each experiment's summary.json as a report section: the paper-style table, its plot,
and the published number beside ours where the paper gives one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vislens.experiments.perception.perceive import best_chance
from vislens.render.page import Section, TableData, fmt

if TYPE_CHECKING:  # the summary.json contracts each section reads (no import at run time)
    from vislens.experiments.ablation import AblationSummary
    from vislens.experiments.accuracy import AccuracySummary
    from vislens.experiments.attention import AttentionSummary
    from vislens.experiments.knockout import KnockoutSummary
    from vislens.experiments.logit_lens import LensSummary
    from vislens.experiments.patching import PatchSummary
    from vislens.experiments.perception.artifacts import (
        ArtifactsSummary,
        HeldOutChange,
        HeldOutTask,
    )
    from vislens.experiments.perception.perceive import PerceiveSummary, TaskEntry
    from vislens.experiments.perception.prefix import PrefixSummary
    from vislens.experiments.perception.surface import SurfaceSummary


def accuracy_section(summary: AccuracySummary) -> Section:
    rows = [[s, summary["accuracy"][s]] for s in summary["accuracy"]]
    return Section(
        "accuracy", "Does the model see? Accuracy on fresh ShapesWorld scenes",
        "Before interpreting a model, check it answers: generative (the target's name appears "
        "in the description), polling (balanced yes / no), VQA (one word after a fixed prefix).",
        tables=[TableData(f"accuracy on {summary['n']} scenes (seed {summary.get('seed')})",
                          ["setting", "accuracy"], rows)])


def funnel_table(summary: AblationSummary | LensSummary | KnockoutSummary | PatchSummary
                 ) -> TableData | None:
    """How many images each selection step kept, per setting (experiments/funnel.py)."""
    funnel = summary.get("funnel")
    if not funnel:
        return None
    from vislens.experiments.funnel import LABELS

    settings = list(funnel["counts"])
    rows = [[LABELS.get(step, step), *[funnel["counts"][s].get(step) for s in settings]]
            for step in funnel["steps"]
            if any(funnel["counts"][s].get(step) is not None for s in settings)]
    return TableData("selection funnel: images left after each step", ["step", *settings],
                     rows)


def _funnel(summary: AblationSummary | LensSummary | KnockoutSummary | PatchSummary
            ) -> list[TableData]:
    table = funnel_table(summary)
    return [table] if table else []


def _funnel_notes(summary: AblationSummary | LensSummary | KnockoutSummary | PatchSummary
                  ) -> list[str]:
    return list((summary.get("funnel") or {}).get("lost", {}).values())


def ablation_section(summary: AblationSummary) -> Section:
    settings = list(summary["drop"])
    names = list(dict.fromkeys(c for s in settings for c in summary["drop"][s]))
    header = ["condition"] + [h for s in settings for h in
                              (f"{s} % broken", f"{s} 95% CI", f"{s} paper %")]
    rows = []
    for c in names:
        row: list[object] = [c]
        for s in settings:
            ci = summary["ci95"][s].get(c)
            row += [summary["drop"][s].get(c),
                    f"{ci[0]:.0f}–{ci[1]:.0f}" if ci else None,
                    summary["paper"].get(s, {}).get(c)]
        rows.append(row)
    kept = ", ".join(f"{s}: {summary['n_kept'][s]}" for s in settings)
    ref = summary.get("reference")
    vector = "zeros" if ref is None else (
        f"the mean image embedding over {ref['n_images']} images of {ref['spec']} "
        f"({'disjoint from' if ref.get('disjoint') else 'OVERLAPPING'} the evaluated images)")
    return Section(
        "ablation", "A1. Token ablation: where does object information live?",
        f"LM input embeddings of each token set are replaced by {vector}; the table gives the "
        "% of initially-correct samples (kept only when noising the object's pixels breaks "
        "them) that become wrong; a random set of the same size is the chance level. Paper: "
        "Neo et al. 2024, LLaVA-1.5-7B, COCO (definitions: docs/PROTOCOL.md).",
        tables=[TableData(f"% broken (kept samples: {kept})", header, rows),
                *_funnel(summary)],
        images=[("% of correct answers broken per condition, with 95% Wilson intervals",
                  Path(summary["plot"]))],
        notes=_funnel_notes(summary))


def logit_lens_section(summary: LensSummary, max_viewers: int = 3) -> Section:
    paper = summary["paper"]
    rows: list[list[object]] = [
        ["object patches decoding to their word (any layer)", summary["hit_rate"],
         paper["hit_rate"]],
        ["background patches decoding to the object's word", summary["background_rate"], None],
        ["mean best layer", summary["peak_layer_mean"], paper["peak_layer_mean"]],
        ["residual states (layers + embeddings)", summary["n_layers"], paper["n_layers"]],
    ]
    pages = [(f"interactive logit-lens viewer: {Path(p).stem}", Path(p).read_text())
             for p in summary["viewer"][:max_viewers]]
    return Section(
        "logit-lens", "A2. Logit lens on image tokens: do they become words?",
        "Every image token's residual stream at every layer (embeddings = 0 .. last) through "
        "the final norm (once) and the unembedding; top-k kept. Hit rule: "
        + summary.get("hit_rule", "a token of the object's word in the top-k") + ". "
        "Hover a cell in a viewer to see its patch and top-k.",
        tables=[TableData(f"{summary['n_images']} images, {summary['n_object_patches']} object "
                          "patches", ["measure", "ours", "paper (LLaVA-1.5-7B)"], rows),
                *_funnel(summary)],
        images=[("share of the object's patches, and of every image token, whose top-k holds "
                 "the object's word, per layer",
                 Path(summary["plot"]))],
        pages=pages, notes=_funnel_notes(summary))


def knockout_section(summary: KnockoutSummary) -> Section:
    labels = summary["window_labels"]
    kept = ", ".join(f"{s}: {k}" for s, k in summary["n_kept"].items())
    rows = [[c, *v] for c, v in summary["relative_accuracy"].items()]
    prob = [[c, *v] for c, v in summary["prob_change"].items()]
    first = summary.get("relative_accuracy_first_token")  # absent from older runs
    tables = [TableData(f"relative accuracy, every answer token kept (vislens; kept samples: "
                        f"{kept})", ["edges blocked", *labels], rows)]
    if first is not None:
        tables.append(TableData("relative accuracy, first answer-word token kept (Neo et al.'s "
                                "rule)", ["edges blocked", *labels],
                                [[c, *v] for c, v in first.items()]))
    tables.append(TableData("mean change in p(answer)", ["edges blocked", *labels], prob))
    tables += _funnel(summary)
    return Section(
        "knockout", "A3. Attention knockout: how does the answer read the image?",
        "Attention edges are blocked (additive -inf on exactly those query/key pairs) in "
        "windows of layers; relative accuracy = share of clean-correct answers that survive, "
        "judged on every answer token and, as Neo et al. did, on the first one. "
        "Paper: blocking object+1 -> last in mid-late layers ~0.82, all layers ~0.67; "
        "-> last row ~1.0.",
        tables=tables,
        images=[("relative accuracy per condition and layer window, every answer token",
                 Path(summary["plot"]))]
        + ([("relative accuracy, first answer-word token (Neo et al.'s rule)",
             Path(summary["plot_first_token"]))] if summary.get("plot_first_token") else []),
        notes=_funnel_notes(summary))


def _interval(ci: list[float] | None) -> str | None:
    return None if ci is None else f"{ci[0]:.2f}–{ci[1]:.2f}"


def patch_section(summary: PatchSummary, max_viewers: int = 1) -> Section:
    layers = [str(x) for x in summary["layers"]]
    tables = []
    for kind, by_group in summary["restored"].items():
        rows = [[g, *[f"{fmt(m, 2)} ({_interval(c)})" if m is not None else None
                      for m, c in zip(curve["mean"], curve["ci95"])]]
                for g, curve in by_group.items()]
        tables.append(TableData(f"{kind}: share of the logit difference restored, mean (95% "
                                f"bootstrap interval) over {summary['n_pairs']} pairs; restoring "
                                f"nothing = {summary['reference']['nothing']:g}, everything = "
                                f"{summary['reference']['everything']:g}",
                                ["group \\ layer", *layers], rows))
    for kind, by_layer in summary["attribution"].items():
        att = [[x, a["spearman"], _interval(a["spearman_ci95"]), a["topk_overlap"],
                a["topk_restored"], _interval(a["topk_restored_ci95"]), a["n"]]
               for x, a in by_layer.items()]
        tables.append(TableData(f"single image tokens ({kind}): attribution patching vs exact "
                                "patching (chance Spearman 0)",
                                ["layer", "Spearman", "95% CI", "top-k overlap",
                                 "top-k by attribution restore", "95% CI", "pairs"], att))
    tables += _funnel(summary)
    images = [(f"restored share per layer and token group ({kind})", Path(p))
              for kind, p in summary["plots"].items()]
    images += [("single tokens restored, exact and attribution, on the image", Path(p))
               for p in summary["maps"][:1]]
    pages = [(f"interactive causal-tracing viewer: {Path(p).stem}", Path(p).read_text())
             for p in summary.get("viewers", [])[:max_viewers]]
    return Section(
        "patch", "Causal tracing: where does the answer read the object?",
        f"Clean and corrupted images ({summary['corrupt']}) with the same question; the "
        "clean run's activations are restored in the corrupted run, one token group and "
        "layer at a time, and the share of the logit difference (answer - foil, first "
        "tokens, at the answer position) that comes back is measured. Complements the "
        "knockout: there blocking edges, here restoring activations. Hover a token in the "
        "viewer to read what restoring it alone brings back.",
        tables=tables, images=images, pages=pages, notes=_funnel_notes(summary))


def timing_section(times: dict[str, float]) -> Section:
    rows = [[k, fmt(v, 1)] for k, v in times.items()]
    return Section("timing", "Time taken", tables=[TableData("seconds per step",
                                                             ["step", "seconds"], rows)])


def _held_out(e: TaskEntry, kind: str) -> tuple[object, object]:
    sel = e.get("selected", {}).get(kind)
    return (None, None) if sel is None else (sel["score"], sel["layer"])


def _perception_rows(tasks: dict[str, TaskEntry]) -> list[list[object]]:
    rows = []
    for task, e in tasks.items():
        rows.append([task, e["metric"], *_held_out(e, "values"), *_held_out(e, "keys"),
                     e.get("projector"), e.get("vision"), best_chance(e),
                     f"{e.get('n_selection', '–')} / {e.get('n_heldout', '–')}"])
    return rows


PERCEPTION_HEADER = ["task", "metric", "values (held-out layer)", "layer",
                     "keys (held-out layer)", "layer", "projector", "vision encoder",
                     "best chance level", "items (selection / held-out)"]


def perceive_section(summary: PerceiveSummary) -> Section:
    return Section(
        "perceive", "B1. Zero-shot perception from the LM's image keys and values",
        "Each task is scored from image keys / values of every LM layer, from the projector "
        "output (the LM input) and from the vision encoder output. Paper (Liu et al. 2025): "
        "LM values carry enough for these tasks zero-shot, the LM adds to its input, and the "
        "vision encoder alone is often better.",
        tables=[TableData("layer chosen on the selection half, every source scored on the "
                          "held-out half (pixel level)",
                          PERCEPTION_HEADER,
                          _perception_rows(summary["tasks"]))],
        images=[(_curve_caption(Path(p).stem, summary["tasks"]), Path(p))
                for p in summary["plots"]])


def _curve_caption(task: str, tasks: dict[str, TaskEntry]) -> str:
    entry = tasks.get(task)
    metric = entry.get("metric", "score") if entry else "score"
    oracle = " (object chosen with the ground truth: an upper bound)" if "oracle" in task else ""
    return (f"{task}{oracle}: {metric} of image values and keys per LM layer; dashed: "
            "projector output and vision encoder")


def _headline_rows(headline: dict[str, HeldOutTask], kind: Literal["values", "keys"] = "values"
                   ) -> list[list[object]]:
    """One row per task: the change at the layer chosen on the selection half, measured
    on the held-out half, with its bootstrap interval and item counts."""
    rows = []
    for task, entry in headline.items():
        h: HeldOutChange | dict = entry.get(kind) or {}
        ci = h.get("ci95")
        rows.append([task, entry.get("metric"), h.get("layer"), h.get("before"),
                     h.get("after"), h.get("delta"),
                     f"{ci[0]:+.3f} to {ci[1]:+.3f}" if ci else None,
                     f"{h.get('n_select', '–')} / {h.get('n_eval', '–')}"])
    return rows


HEADLINE_HEADER = ["task", "metric", "layer (chosen on the selection half)", "before", "after",
                   "change", "95% bootstrap interval", "items (selection / held-out)"]


def prefix_section(summary: PrefixSummary) -> Section:
    oracle = bool(summary.get("oracle"))
    headline = (summary.get("oracle_headline") if oracle else summary.get("headline")) or {}
    label = " (ORACLE: the prefix names the answer)" if oracle else ""
    return Section(
        "prefix", "B3. A text prefix before the image",
        f"Perception re-measured with the prefix {summary['prefix']!r}{label} before the "
        "image; the change is prefixed minus clean. Its layer is chosen on half the items and "
        "the change is measured on the other half (layer 0 cannot change: the prefix reaches "
        "image tokens only through attention).",
        tables=[TableData("change of the values' score (prefixed - clean), held out",
                          HEADLINE_HEADER, _headline_rows(headline)),
                TableData("with the prefix", PERCEPTION_HEADER,
                          _perception_rows(summary["prefixed"]))],
        images=[(f"{Path(p).stem.removesuffix('-prefix')}: values and keys per LM layer "
                 "without (solid) and with (dotted) the prefix", Path(p))
                for p in summary.get("plots", [])])


def artifacts_section(summary: ArtifactsSummary) -> Section:
    rows = [[layer, count, summary["score_max"][layer], summary["score_mean"][layer]]
            for layer, count in summary["n_flagged"].items()]
    mc = summary["multiple_choice"]
    ci = mc.get("delta_ci95")
    return Section(
        "artifacts", "B2. Input-agnostic key artifacts, and blocking them",
        "Each image key position is scored per layer by how little it varies across images "
        "relative to its input: score = max(0, 1 - key variance ratio / input variance ratio), "
        "so 1 = the key ignores its input and 0 = it varies at least as much as its input. "
        "Positions above mean + z std and above the minimum score are flagged, then text "
        "positions are blocked from reading them.",
        tables=[TableData("flagged key positions per layer",
                          ["layer", "flagged", "max score", "mean score"], rows),
                TableData("perception change with the artifacts blocked (values), held out",
                          HEADLINE_HEADER,
                          _headline_rows(summary["perceive"].get("headline") or {})),
                TableData("multiple choice", ["kind", "n", "clean", "artifacts blocked",
                                              "change", "95% bootstrap interval", "chance"],
                          [[mc["kind"], mc["n"], mc["clean_accuracy"],
                            mc["knockout_accuracy"], mc.get("delta"),
                            f"{ci[0]:+.3f} to {ci[1]:+.3f}" if ci else None,
                            mc.get("chance_accuracy")]])],
        images=[("artifact scores on the image-token grid (x = flagged)",
                 Path(summary["grid_plot"]))])


Outcome = Literal["solved_by_values_not_model", "solved_by_model_not_values", "both", "neither"]


def surface_section(summary: SurfaceSummary) -> Section:
    keys: tuple[Outcome, ...] = ("solved_by_values_not_model", "solved_by_model_not_values",
                                 "both", "neither")
    rows = [[k.replace("_", " "), summary[k]] for k in keys]
    return Section(
        "surface", "B4. Present in the values, not surfaced in the answer",
        "Multiple-choice items: the model's own answer against a readout from image values "
        "(the candidate whose mean value is closest to the reference's, layer chosen on a "
        "held-out half). Paper: 33.3% of BLINK Art Style questions are solved by the values "
        "but answered wrongly.",
        tables=[TableData(f"{summary['n_scored']} scored items ({summary['kind']}), layer "
                          f"{summary['best_layer']}", ["outcome", "items"], rows),
                TableData("accuracy", ["source", "ours", "paper"],
                          [["image values", summary["values_accuracy"]["rate"], None],
                           ["model answer", summary["model_accuracy"]["rate"], None],
                           ["chance", summary["chance_accuracy"], None],
                           ["present but not surfaced", summary["present_not_surfaced"]["rate"],
                            0.333],
                           ["present but not surfaced, chance level",
                            summary.get("present_not_surfaced_chance"), None]])],
        images=[("values readout accuracy per layer", Path(summary["plot"]))],
        notes=[_beats_chance(summary)] if "values_beat_chance" in summary else [])


def _beats_chance(summary: SurfaceSummary) -> str:
    perm = summary.get("values_permutation") or {}
    p = perm.get("p_value")
    verdict = "beats" if summary["values_beat_chance"] else "does NOT beat"
    tail = f" (permutation p = {p:.3f})" if isinstance(p, float) else ""
    return (f"The values readout {verdict} chance{tail}"
            + ("" if summary["values_beat_chance"] else ": the headline is noise") + ".")


def _share(value: float | None, ci: list[float] | None = None, digits: int = 3) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return text if not ci else f"{text} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})"


def attention_section(summary: AttentionSummary, max_viewers: int = 2) -> Section:
    per, ci = summary["per_layer"], summary["per_layer_ci95"]
    first = summary.get("first_token") or "?"
    rows = [[layer, _share(per["image"][layer], ci["image"][layer]),
             _share(per["text"][layer]), _share(per["first"][layer]),
             _share(summary["object_share"][layer], summary["object_share_ci95"][layer]),
             _share(summary["area_share"][layer]),
             _share(summary["peak_on_object"][layer], digits=2)]
            for layer in range(summary["n_layers"])]
    header = ["layer", "image tokens (95% CI)", "text tokens", f"first token ({first})",
              "object's share of image attention (95% CI)", "object's share of image tokens",
              "peak patch on the object"]
    top, best = summary["peak_layer_image"], summary["peak_layer_object"]
    acc = summary.get("answer_accuracy")
    headline: list[list[object]] = [
        ["layer with the most attention on the image", top,
         _share(per["image"][top]) if top is not None else None],
        ["layer where the object draws most (share of image attention / share of tokens)",
         best, _share(summary["object_lift"][best], digits=1) + "x" if best is not None
         else None],
        ["largest attention on the first token (any layer)", None,
         _share(max((v for v in per["first"] if v is not None), default=None))],
    ]
    if acc:
        headline.append(["first answer token right (share of images)", None,
                         _share(acc["rate"], acc["ci95"], digits=2)])
    query = summary["query_label"]
    token = summary.get("query_token") or "?"
    pages = [(f"interactive attention viewer: {v['sample']}, “{v['prompt']}” answered "
              f"“{v['answer']}” (target: {v['target']})", Path(v["path"]).read_text())
             for v in summary.get("viewers", [])[:max_viewers]]
    return Section(
        "attention", "Attention of the answer: which image patches does it read?",
        f"The attention row of the {query} (token {token!r}) in every layer, post-softmax and "
        "averaged over heads, split into image tokens, text tokens and the first token (an "
        "attention sink in most real models). The object's share of the image attention is "
        "set against its share of the image tokens: equal shares mean the query looks at the "
        "object no more than at any other patch. In a viewer, hover a layer, a head or a "
        "patch.",
        tables=[TableData(f"{summary['n_images']} images, {summary['setting']} prompts",
                          ["measure", "layer", "value"], headline),
                TableData("per layer, mean over images and heads", header, rows)],
        images=[("where the query's attention goes, per layer (bands: 95% bootstrap intervals "
                 "over images)", Path(summary["plot"])),
                ("the object's share of the image attention against its share of the image "
                 "tokens", Path(summary["object_plot"]))],
        pages=pages)
