"""One small registry class for everything looked up by name.

Backbones, regimes, data sources and search spaces are registered as tiny builder
functions under a name; configs name them, and an unknown name fails with the list of
valid ones instead of a KeyError deep inside a worker.

Each registry names the package that registers its built-in entries (its *provider*) and
imports it on first lookup. That is what lets `robustseg.config` check every name a config
gives while it loads, without importing the component packages itself (they import the
config: the dependency points one way, and the registry is the plug between them).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Generic, Iterator, Optional, TypeVar

from robustseg.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping with a decorator for registration.

    Args:
        kind: What is registered ("backbone", "source", ...), used in error messages.
        provider: Dotted name of the module registering the built-in entries, imported on
            the first lookup (None: entries come only from explicit registration).
    """

    def __init__(self, kind: str, provider: Optional[str] = None) -> None:
        self.kind = kind
        self.provider = provider
        self._loaded = provider is None
        self._items: Dict[str, T] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # before the import: the provider's own registrations land here
            try:
                importlib.import_module(self.provider)
            except BaseException:
                self._loaded = False
                raise

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
        self._load()
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
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)


SOURCES: "Registry[Any]" = Registry("source", "robustseg.data.sources")
BACKBONES: "Registry[Any]" = Registry("backbone", "robustseg.models")
REGIMES: "Registry[Any]" = Registry("regime", "robustseg.regimes")
SEARCH_SPACES: "Registry[Any]" = Registry("search space", "search_spaces")
PLANS: "Registry[Any]" = Registry("preprocessing plan", "robustseg.data.preprocess")
#: Checks of a config section that its owning package knows how to make, run by
#: `robustseg.config.check_components` as ``check(cfg, spatial_dims)`` (raise `ConfigError`).
SECTION_CHECKS: "Registry[Any]" = Registry("config section check", "robustseg.augment")

__all__ = ["Registry", "SOURCES", "BACKBONES", "REGIMES", "SEARCH_SPACES", "PLANS", "SECTION_CHECKS"]
