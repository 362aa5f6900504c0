"""Adding a family is one file: a module in models/families/ with a `@register`-ed class
is found by its model_type with nothing else edited; a module that forgets the decorator,
or claims a model type another family has, fails here rather than at a user's load."""

import ast
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest

import vislens.models.families as families
from vislens.models.families import FAMILIES, MODULES, Family, Generic, family_for, register
from vislens.models.families.qwen2_5_vl import Qwen25VL
from vislens.models.loading import detect_family

NEW_FAMILY = '''
from vislens.models.families.base import Family
from vislens.models.families.registry import register


@register
class Brandnew(Family):
    model_type = "brandnew_vl"
    label = "Brand-new VL"
'''


@pytest.fixture
def registry():
    """The registry as it was before the test, whatever the test registers."""
    saved = dict(FAMILIES)
    yield FAMILIES
    FAMILIES.clear()
    FAMILIES.update(saved)


@pytest.fixture
def new_module(tmp_path, monkeypatch, registry):
    """A family module dropped into the package's folder (a second folder of the package,
    so the source tree is left alone)."""
    (tmp_path / "brandnew_vl.py").write_text(NEW_FAMILY)
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    name = f"{families.__name__}.brandnew_vl"
    yield name
    sys.modules.pop(name, None)
    if hasattr(families, "brandnew_vl"):
        delattr(families, "brandnew_vl")


def unregistered(module: ModuleType) -> list[str]:
    """Family classes a module declares (a model_type of their own) that are not the
    registered family of that model type: a forgotten `@register`."""
    return [cls.__qualname__ for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, Family) and cls.__module__ == module.__name__
            and cls.model_type and type(FAMILIES.get(cls.model_type)) is not cls]


def test_a_new_module_is_found_by_its_model_type(new_module, tmp_path):
    assert "brandnew_vl" not in FAMILIES
    imported = families.import_all()
    assert new_module in {m.__name__ for m in imported}
    spec = family_for("brandnew_vl")
    assert type(spec).__name__ == "Brandnew" and type(spec).__module__ == new_module
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "brandnew_vl"}')
    assert detect_family(model_dir) is spec
    assert "Brand-new VL (brandnew_vl)" in families.supported()
    with pytest.raises(ValueError, match=r"Brand-new VL \(brandnew_vl\)"):
        family_for("bert")


def test_a_class_decorated_anywhere_is_found(registry):
    @register
    class Inline(Family):
        model_type = "inline_vl"

    assert isinstance(family_for("inline_vl"), Inline)
    assert not isinstance(family_for("inline_vl"), Generic)


def test_every_family_module_registers_its_families():
    names = {m.__name__.rsplit(".", 1)[1] for m in MODULES}
    on_disk = {p.stem for p in Path(families.__file__).parent.glob("*.py")} - {"__init__"}
    assert names == on_disk  # every file of the folder is imported
    for module in MODULES:
        assert unregistered(module) == [], module.__name__
    registered_from = {type(f).__module__ for f in FAMILIES.values()}
    assert registered_from <= {m.__name__ for m in MODULES}
    assert len(registered_from) == len(FAMILIES) == 11  # one module per family


def test_a_module_without_the_decorator_is_caught():
    module = ModuleType(f"{families.__name__}.forgotten")

    class Forgotten(Family):
        model_type = "forgotten_vl"

    Forgotten.__module__ = module.__name__
    module.Forgotten = Forgotten
    assert unregistered(module) == ["test_a_module_without_the_decorator_is_caught.<locals>"
                                    ".Forgotten"]


def test_a_model_type_is_registered_once(registry):
    before = dict(FAMILIES)
    with pytest.raises(ValueError, match=r"'llava' is already registered by "
                       r"vislens\.models\.families\.llava\.Llava"):
        @register
        class Impostor(Family):
            model_type = "llava"

    with pytest.raises(ValueError, match="'qwen2_5_vl' is already registered"):
        @register
        class ForgotItsType(Qwen25VL):  # a subclass that kept its parent's model_type
            pass

    with pytest.raises(ValueError, match="has no model_type"):
        @register
        class Nameless(Family):
            pass

    with pytest.raises(TypeError, match="Family subclass"):
        register(object)
    assert FAMILIES == before
    assert register(type(FAMILIES["llava"])) is type(FAMILIES["llava"])  # a re-import


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_families_do_not_import_vlm():
    """vlm.py imports the families, so no family module (nor the types they share with it)
    may import vlm.py or loading.py back, not even inside a function."""
    models = Path(families.__file__).parent.parent
    for path in [*models.joinpath("families").glob("*.py"), models / "embeddings.py"]:
        bad = _imports(path) & {"vislens.models.vlm", "vislens.models.loading"}
        assert not bad, f"{path.name} imports {bad}"
