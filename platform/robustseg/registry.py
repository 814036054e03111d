"""One small registry class for everything looked up by name.

Backbones, regimes, data sources and search spaces are registered as tiny builder
functions under a name; configs name them, and an unknown name fails with the list of
valid ones instead of a KeyError deep inside a worker.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterator, TypeVar

from robustseg.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping with a decorator for registration.

    Args:
        kind: What is registered ("backbone", "source", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; extra keywords are kept as metadata.

        Raises:
            ValueError: if the name is already taken (two builders must never race).
        """

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises:
            UnknownNameError: (a KeyError) naming the unknown entry and listing the valid ones.
        """
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def meta(self, name: str) -> Dict[str, Any]:
        """Metadata given at registration (e.g. the params dataclass of a backbone)."""
        self.get(name)
        return self._meta[name]

    def names(self) -> list:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


SOURCES: "Registry[Any]" = Registry("source")
BACKBONES: "Registry[Any]" = Registry("backbone")
REGIMES: "Registry[Any]" = Registry("regime")
SEARCH_SPACES: "Registry[Any]" = Registry("search space")
PLANS: "Registry[Any]" = Registry("preprocessing plan")

__all__ = ["Registry", "SOURCES", "BACKBONES", "REGIMES", "SEARCH_SPACES", "PLANS"]
