"""The compressor registry: ``@register_compressor("name")`` beside the class.

Configs refer to methods by name, and an unknown name raises ``ValueError`` listing what is
registered. Built-in methods register when ``actcomp_dist.compression`` is imported; a plugin
module registers its own when the run config's ``plugins`` list imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actcomp_dist.registry import Registry

if TYPE_CHECKING:
    from actcomp_dist.compression.base import Compressor

COMPRESSORS: Registry[type[Compressor]] = Registry("compression method", attribute="name")


def register_compressor(name: str):
    """Class decorator that registers a :class:`Compressor` subclass under ``name``."""
    return COMPRESSORS.register(name)


def get_compressor_class(name: str) -> type[Compressor]:
    return COMPRESSORS.get(name)


def list_compressors() -> list[str]:
    """Names of the registered compression methods, sorted."""
    return COMPRESSORS.names()
