"""Small helpers shared by every HTML page we write."""

from __future__ import annotations

import base64
import functools
import html
import io
import string
from importlib import resources
from pathlib import Path

from PIL import Image


def image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def png_file_data_uri(path) -> str:
    with open(path, "rb") as f:
        return f"data:image/png;base64,{base64.b64encode(f.read()).decode()}"


def write_page(path: Path, page: str) -> Path:
    """Write an HTML page whole or not at all (a temporary file renamed over it), its folder
    made first: a run cut off leaves no half page for a browser to open."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


@functools.cache
def template(name: str) -> string.Template:
    """The template file src/vislens/render/templates/<name>, read once (package data, so it
    ships in the wheel and reads the same from a zip)."""
    text = (resources.files("vislens.render") / "templates" / name).read_text(encoding="utf-8")
    return string.Template(text)


def fill(name: str, **values: object) -> str:
    """The template file `name` with each `$key` (or `${key}` before a letter) replaced by
    str(values[key]), in one pass.

    Why string.Template: it is the standard library's plainest substitution, and the one
    whose marker (`$`) appears in neither our CSS nor our JavaScript, where `{}` is
    everywhere (str.format needed every brace doubled). One pass means a value that holds
    `$name` or braces lands verbatim, never substituted again. It is strict both ways: a
    `$key` with no value, a stray `$` (write `$$` for a literal one, e.g. a JavaScript
    template literal `$${x}`), or a value the template never uses raises here, at the first
    render, instead of writing a page with a hole in it.
    """
    tmpl = template(name)
    used = {m.group("named") or m.group("braced") for m in tmpl.pattern.finditer(tmpl.template)}
    unused = sorted(set(values) - used)
    if unused:
        raise KeyError(f"{name} has no ${', $'.join(unused)}")
    return tmpl.substitute(values)
