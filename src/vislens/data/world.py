"""`vislens world`: a ShapesWorld dataset on disk, in COCO format plus its questions.

Lets people look at (and other tools read) exactly the scenes and questions the
experiments use, without the Python generator.
"""

from __future__ import annotations

import json
from pathlib import Path

from vislens.data import shapesworld
from vislens.data._io import atomic_dir
from vislens.data.coco import IMAGES, write_coco
from vislens.data.samples import SETTINGS

QUESTIONS = "questions.jsonl"


def write_world(out_dir: str | Path, n: int, seed: int = shapesworld.HELD_OUT_SEED,
                overwrite: bool = False) -> dict:
    """Scenes 0..n-1 of world `seed` as COCO + `questions.jsonl`, all or nothing.

    Each question line: sample_id, image (path relative to out_dir), setting,
    prompt, answer_prefix, answer, target (instance index), target_name, kind.
    The questions are the ones `shapesworld.questions` gives with its default
    per-scene generator, so they are the same every time.
    Returns a summary (out, scenes, seed, instances, categories, questions).
    The world's seed is written to the annotations' `info.vislens_world`, and the toys'
    training world is refused (as `shapesworld:0` is), so no copy of it can be evaluated.
    """
    shapesworld.check_held_out(seed)
    samples = shapesworld.generate(n, seed=seed)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        dataset = write_coco(samples, tmp, info={"vislens_world": seed})
        files = {img["vislens_id"]: img["file_name"] for img in dataset["images"]}
        n_questions = 0
        with open(tmp / QUESTIONS, "w") as fh:
            for sample in samples:
                for setting in SETTINGS:
                    for q in shapesworld.questions(sample, setting):
                        fh.write(json.dumps({
                            "sample_id": sample.id, "image": f"{IMAGES}/{files[sample.id]}",
                            "setting": q.setting, "prompt": q.prompt,
                            "answer_prefix": q.answer_prefix, "answer": q.answer,
                            "target": q.target, "target_name": q.target_name, "kind": q.kind,
                        }) + "\n")
                        n_questions += 1
    return {"out": str(out_dir), "scenes": len(samples), "seed": seed,
            "instances": len(dataset["annotations"]),
            "categories": len(dataset["categories"]), "questions": n_questions}
