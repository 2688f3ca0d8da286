"""The adapter registry: a method is one module class plus one decorator line."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actcomp_dist.adapters.base import LowRankAdapter

_REGISTRY: dict[str, type[LowRankAdapter]] = {}


def register_adapter(name: str):
    """Class decorator that registers a :class:`LowRankAdapter` subclass under ``name``."""

    def decorate(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"adapter {name!r} is already registered by {_REGISTRY[name]}")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_adapter_class(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown adapter method {name!r}; registered: {list_adapter_methods()}")
    return _REGISTRY[name]


def list_adapter_methods() -> list[str]:
    """Names of the registered adapter methods, sorted (importing ``actcomp_dist.adapters``
    registers the built-in ones)."""
    return sorted(_REGISTRY)
