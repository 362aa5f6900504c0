"""What the end-to-end tests on the look-alikes share: the CLI in --json mode, a run's rows,
and the data every command reads (the `data` fixture in conftest.py builds it once)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from answer_head import lens_scenes, mc_items, scenes
from native_formats import (
    write_blink,
    write_davis,
    write_image_folder,
    write_refcoco,
    write_spair,
    write_voc,
)
from typer.testing import CliRunner

from vislens.cli import app
from vislens.data import tasks as shapes_tasks
from vislens.data.coco import export_coco


def cli(*args) -> dict:
    result = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rows_of(out: Path) -> list[dict]:
    return pq.read_table(out / "rows.parquet").to_pylist()


def e2e_data(root: Path) -> dict[str, Path]:
    """The scenes as COCO data sets (small targets; one large object) and a fixture in each
    native format a command reads: VOC, RefCOCO, SPair-71k, DAVIS, BLINK, ImageNet folders."""
    write_voc(root / "VOC2012", shapes_tasks.semantic_maps(2, seed=3))
    return {
        "coco": export_coco(scenes(), root / "coco"),
        "lens": export_coco(lens_scenes(), root / "lens"),
        "voc": root / "VOC2012",
        "refcoco": write_refcoco(root / "refcoco", shapes_tasks.referring_expressions(2, seed=6)),
        "spair": write_spair(root / "SPair-71k", shapes_tasks.correspondence_pairs(2, seed=7)),
        "davis": write_davis(root / "DAVIS", shapes_tasks.videos(2, seed=8, frames=3)),
        "blink": write_blink(root / "art_style.parquet", mc_items()),
        "imagenet": write_image_folder(root / "imagenet",
                                        [m.sample for m in shapes_tasks.semantic_maps(2, seed=4)]),
    }
