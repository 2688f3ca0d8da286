"""The compressor registry: a method is one file in this package plus one decorator line.

``@register_compressor("name")`` beside the class; configs refer to methods by name, and an
unknown name raises ``ValueError`` listing what is registered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actcomp_dist.compression.base import Compressor

_REGISTRY: dict[str, type[Compressor]] = {}


def register_compressor(name: str):
    """Class decorator that registers a :class:`Compressor` subclass under ``name``."""

    def decorate(cls: type[Compressor]) -> type[Compressor]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"compressor {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_compressor_class(name: str) -> type[Compressor]:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown compression method {name!r}; registered methods: {list_compressors()}"
        )
    return _REGISTRY[name]


def list_compressors() -> list[str]:
    """Names of the registered compression methods, sorted."""
    return sorted(_REGISTRY)
