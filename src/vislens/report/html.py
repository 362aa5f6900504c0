"""Small helpers shared by every HTML page we write."""

from __future__ import annotations

import base64
import html
import io

from PIL import Image


def image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def png_file_data_uri(path) -> str:
    with open(path, "rb") as f:
        return f"data:image/png;base64,{base64.b64encode(f.read()).decode()}"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)
