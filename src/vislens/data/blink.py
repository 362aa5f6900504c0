"""BLINK: parquet rows (idx, question, image_1..image_4, choices, answer "(A)", ...).

Images are Hugging Face `Image` cells: a struct {bytes, path} (or raw bytes);
missing images (fewer than four) are null. Read with pyarrow, no `datasets`.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from vislens.data._io import open_image
from vislens.data.samples import MultipleChoice

IMAGE_COLUMNS = ("image_1", "image_2", "image_3", "image_4")
REQUIRED = ("idx", "question", "choices", "answer", "image_1")


def load_blink(path: str | Path, limit: int | None = None) -> list[MultipleChoice]:
    """Items of one parquet file, or of every *.parquet under a folder (name order)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no .parquet files under {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path} not found; pass a BLINK parquet file or folder")
    out: list[MultipleChoice] = []
    for file in files:
        table = pq.read_table(file)
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise ValueError(f"{file} lacks BLINK column(s) {', '.join(missing)}")
        for row in table.to_pylist():
            images = [_decode(row[c], file) for c in IMAGE_COLUMNS if row.get(c) is not None]
            meta = {k: row[k] for k in ("idx", "sub_task", "prompt", "explanation") if k in row}
            meta["file"] = str(file)
            out.append(MultipleChoice(id=str(row["idx"]), question=row["question"],
                                      images=images, choices=list(row["choices"]),
                                      answer=row["answer"], meta=meta))
            if limit is not None and len(out) >= limit:
                return out
    return out


def _decode(cell, file: Path) -> Image.Image:
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        raise ValueError(f"{file}: an image cell has no bytes (only path "
                         f"{cell.get('path') if isinstance(cell, dict) else None!r})")
    with open_image(io.BytesIO(data), f"an image cell of {file}") as img:
        return img.convert("RGB")
