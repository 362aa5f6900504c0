"""Where family modules declare themselves, so that a new family is one new module.

The package imports every module of its folder (families/__init__.py), and a module's
`@register` puts its family here: no list to edit, and a module whose class is not
decorated is caught by the test that every declared family is registered.
"""

from __future__ import annotations

from typing import TypeVar

from vislens.models.families.base import Family

F = TypeVar("F", bound=type[Family])

# model_type -> the one instance vislens uses (families are stateless declarations)
FAMILIES: dict[str, Family] = {}


def register(cls: F) -> F:
    """Class decorator: make `cls` the family of its `model_type`.

    Two classes claiming one model type would make the choice depend on import order,
    so the second is refused (re-importing the same class, as a reload does, is not).
    """
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise TypeError(f"@register takes a Family subclass, not {cls!r}")
    name = cls.model_type
    if not name:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__} has no model_type; a family "
                         "is registered under the model_type of its config.json")
    known = FAMILIES.get(name)
    if known is not None and _where(type(known)) != _where(cls):
        raise ValueError(f"model_type {name!r} is already registered by "
                         f"{_where(type(known))}; {_where(cls)} cannot register it too")
    FAMILIES[name] = cls()
    return cls


def supported() -> str:
    """The registered families, as error messages list them (read at the time of the error,
    so that a family registered after import is listed too)."""
    return ", ".join(f"{f.label} ({name})" for name, f in sorted(FAMILIES.items()))


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
