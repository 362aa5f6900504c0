"""README's Python example runs as printed and shows what its comments say."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_api_example_runs_and_the_object_is_gone():
    text = README.read_text()
    code = re.search(r"```python\n(import vislens.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102
    lines = out.getvalue().splitlines()
    clean = next(line for line in lines if line.startswith("clean:"))
    ablated = next(line for line in lines if line.startswith("ablated:"))
    assert "'triangle'" in clean  # as the README's comments say
    assert "'star'" in ablated
    patched = next(line for line in lines if line.startswith("patched:"))
    assert "'triangle'" in patched  # the diamond scene answers diamond unpatched (below)


def test_readme_patch_example_needs_the_patch():
    """Without the patch the counterfactual scene answers its own shape: the example's
    'triangle' comes from the restored tokens."""
    import vislens
    from vislens.data import shapesworld
    from vislens.data.counterfactual import counterfactual

    vlm = vislens.load("toy")
    scene = shapesworld.make_scene(seed=1000, index=1)
    diamond = counterfactual(scene, 0, "shape").changed.image
    corrupt = vlm.prepare([diamond], ["what shape is the white object ?"], ["it is a"])
    assert vlm.decode(vlm.generate(corrupt, max_new_tokens=1)) == ["diamond"]
