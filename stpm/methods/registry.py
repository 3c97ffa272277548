"""Methods by name: the one table that says which exist. Torch-free: specs only, a method's torch code is
imported when `method(name)` asks for it. Adding a method: its folder under stpm/methods/ (a `spec.py` with
its MethodSpec, its implementation of stpm.methods.base.Method) and its entry here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stpm.methods.patchcore import spec as patchcore
from stpm.methods.spec import MethodSpec
from stpm.methods.stpm import spec as stpm


def _stpm() -> type:
    from stpm.methods.stpm.method import STPMMethod

    return STPMMethod


def _patchcore() -> type:
    from stpm.methods.patchcore.method import PatchCore

    return PatchCore


# name -> (spec, loader of the torch implementation)
_METHODS: dict[str, tuple[MethodSpec, Callable[[], type]]] = {
    stpm.SPEC.name: (stpm.SPEC, _stpm),
    patchcore.SPEC.name: (patchcore.SPEC, _patchcore),
}


def names() -> tuple[str, ...]:
    return tuple(_METHODS)


def spec(name: str) -> MethodSpec:
    """The spec of method `name`; ValueError naming the known methods otherwise."""
    try:
        return _METHODS[name][0]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}") from None


def method(name: str) -> Any:
    """The implementation of method `name` (a stpm.methods.base.Method; imports torch)."""
    spec(name)
    return _METHODS[name][1]()()


def register(new: MethodSpec, load: Callable[[], type]) -> None:
    """Add a method at run time (plugins, tests): its spec and a loader of its implementation class."""
    if new.name in _METHODS:
        raise ValueError(f"method {new.name!r} is already registered")
    _METHODS[new.name] = (new, load)


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


__all__ = ["method", "names", "register", "spec", "unregister"]
