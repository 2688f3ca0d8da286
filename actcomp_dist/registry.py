"""Name -> class registries: one implementation for compression methods and adapter methods.

``Registry("compression method", attribute="name")`` makes a registry whose ``register(name)``
is a class decorator (configs refer to classes by that name, and the decorator sets it on the
class as ``attribute``); ``get`` raises ``ValueError`` listing the registered names; a second
class under a taken name is refused, re-registering the same class (a re-imported module) is
not an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, kind: str, attribute: str) -> None:
        self.kind = kind  # "compression method": how messages name an entry
        self.attribute = attribute  # class attribute that receives the registered name
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator that registers the class under ``name``."""

        def decorate(cls: T) -> T:
            taken = self._classes.get(name)
            if taken is not None and taken is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {taken}")
            setattr(cls, self.attribute, name)
            self._classes[name] = cls
            return cls

        return decorate

    def get(self, name: str) -> T:
        if name not in self._classes:
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {self.names()}"
            )
        return self._classes[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)
