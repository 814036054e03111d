"""Data sources, one module per format, each registered by name in `SOURCES`.

A source is a function ``read(path: str, **options) -> Iterator[Case]`` that yields
validated-shape cases in canonical labels and raises `DataError` naming the file on bad
input. Importing this package registers every built-in source.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterator, List

from robustseg.data.cases import Case
from robustseg.registry import SOURCES

_MODULES = [
    "acdc_h5",
    "acdc_nifti",
    "mnms",
    "cmrxmotion",
    "ct_nifti",
    "slices2d",
    "unlabelled",
    "synthetic",
]

for _m in _MODULES:
    importlib.import_module(f"{__name__}.{_m}")


def read_source(name: str, path: str, **options: Any) -> Iterator[Case]:
    """Yield the cases of registered source ``name`` at ``path``."""
    return iter(SOURCES.get(name)(path, **options))


def parse_source_arg(arg: str) -> "tuple[str, str]":
    """Split a CLI ``NAME:PATH`` argument (the path may itself contain ':')."""
    name, sep, path = arg.partition(":")
    if not sep or not name:
        raise ValueError(f"--source must look like NAME:PATH, got {arg!r}; sources: {SOURCES.names()}")
    return name, path


def parse_source_spec(arg: str) -> Any:
    """``NAME:PATH[?key=value&...]`` -> `robustseg.config.SourceSpec` (option values parsed as YAML scalars).

    Raises:
        ConfigError: not ``NAME:PATH``.
    """
    from urllib.parse import parse_qsl

    import yaml

    from robustseg.config import SourceSpec
    from robustseg.errors import ConfigError

    try:
        name, rest = parse_source_arg(arg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    path, _, query = rest.partition("?")
    options = {k: yaml.safe_load(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    return SourceSpec(name=name, path=path, options=options)


__all__ = ["read_source", "parse_source_arg", "parse_source_spec", "SOURCES", "Case", "List"]
