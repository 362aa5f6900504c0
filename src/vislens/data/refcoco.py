"""RefCOCO / RefCOCO+ / RefCOCOg: refs (sentences + COCO annotation ids) over COCO images.

The release is a folder with `instances.json` (COCO format) and `refs(unc).p`
(or `refs(umd).p`, `refs(google).p`): a pickled list of dicts with ref_id,
ann_id, image_id, split and sentences [{"sent", "sent_id", ...}]. The pickle is
read with an unpickler that refuses every global, so a file can only yield
plain lists, dicts, strings and numbers. A JSON file of the same list works too.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

from vislens.data.coco import coco_sample, find_images_dir, read_instances
from vislens.data.samples import ReferringExpression, Sample


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refs file wants {module}.{name}; only plain data is "
                                     "allowed in a refs pickle")


def read_refs(path: str | Path) -> list[dict]:
    """The list of ref dicts of a refs(*).p pickle or a JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs file {path} not found")
    raw = path.read_bytes()
    if path.suffix == ".json":
        refs = json.loads(raw)
    else:
        try:
            try:  # Python-2 pickles store str as bytes: UTF-8 first, then Latin-1
                refs = _PlainUnpickler(io.BytesIO(raw), encoding="utf-8").load()
            except UnicodeDecodeError:
                refs = _PlainUnpickler(io.BytesIO(raw), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f"{path} is not a plain refs pickle: {err}") from None
    if not isinstance(refs, list) or (refs and not isinstance(refs[0], dict)):
        raise ValueError(f"{path} does not hold a list of refs")
    return refs


def load_refcoco(root: str | Path, split: str | None = "val", images_dir: str | Path | None = None,
                 refs_file: str | Path | None = None, limit: int | None = None
                 ) -> list[ReferringExpression]:
    """One ReferringExpression per sentence of the refs in `split` (None = all).

    `root` holds instances.json and one refs(*).p (else pass `refs_file`);
    images are the COCO train2014 images (`images_dir`, or found next to root).
    """
    root = Path(root)
    instances = root / "instances.json"
    if not instances.is_file():
        raise FileNotFoundError(f"{instances} not found; pass the RefCOCO folder")
    if refs_file is None:
        found = sorted(root.glob("refs(*).p")) + sorted(root.glob("refs*.json"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one refs(*).p in {root}, found {len(found)}; "
                                    "pass refs_file")
        refs_file = found[0]
    refs = [r for r in read_refs(refs_file) if split is None or r.get("split") == split]
    if not refs:
        raise ValueError(f"no refs with split {split!r} in {refs_file}")
    coco = read_instances(instances)
    first = coco.imgs[refs[0]["image_id"]]["file_name"]
    img_root = find_images_dir(instances, images_dir, first,
                               extra=(root / "train2014", root.parent / "train2014",
                                      root.parent / "images" / "train2014"))
    samples: dict[int, Sample] = {}
    out: list[ReferringExpression] = []
    for ref in refs:
        image_id = ref["image_id"]
        if image_id not in coco.imgs:
            raise ValueError(f"ref {ref.get('ref_id')} points at image {image_id}, which "
                             f"{instances.name} does not list")
        if image_id not in samples:
            samples[image_id] = coco_sample(coco, image_id, img_root)
        sample = samples[image_id]
        try:
            target = sample.meta["ann_ids"].index(ref["ann_id"])
        except ValueError:
            raise ValueError(f"ref {ref.get('ref_id')} points at annotation {ref['ann_id']}, "
                             f"which image {image_id} does not have") from None
        for sent in ref.get("sentences", []):
            out.append(ReferringExpression(
                id=f"ref{ref.get('ref_id')}-{sent.get('sent_id')}", sample=sample,
                expression=sent.get("sent") or sent.get("raw", ""), target=target,
                kind="refcoco",
                meta={"ref_id": ref.get("ref_id"), "sent_id": sent.get("sent_id"),
                      "ann_id": ref["ann_id"], "split": ref.get("split")}))
            if limit is not None and len(out) >= limit:
                return out
    return out
