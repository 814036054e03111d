"""Optuna define-by-run search spaces, registered by name in `SEARCH_SPACES`.

A space is a function ``space(trial: optuna.Trial) -> dict`` whose keys are config paths
with ``/`` separators (``"optim/lr"``, ``"model/params/filters_base"``) and whose values are
ready to drop into an `ExperimentConfig` dict. Ray Tune's ``OptunaSearch`` unflattens those
keys into nested dicts, so `apply_sample` accepts both forms (and a mix of them).

Naming rule for ``trial.suggest_*`` calls: a parameter whose sampled value is a config value
is named by its config path (``optim/lr``); a choice that is not itself a config value (mixup
on/off, an attention U-Net's base width from which its channel list is built) is named
``choice/...``. Optuna (TPE in particular) needs one distribution per name within a study,
so a parameter whose range depended on an earlier choice would need a name per branch
(``optim/lr|sgd``); the spaces here avoid such branches. Only the returned dict is applied to
the config: Ray's ``OptunaSearch`` also merges the raw ``suggest_*`` values into the trial
config, and `trainables.tune_driver` keeps the returned point apart from them.

Spaces: one per backbone family (``unet2d``, ``unet3d``, ``swin_unetr``, ``swin_unet``,
``attention_unet``, ``unet``; see `search_spaces.backbones`) and one per training regime that
exists (``supervised``, ``advchain``; see `search_spaces.regimes`).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Mapping

from robustseg.registry import SEARCH_SPACES

SpaceFn = Callable[[Any], Dict[str, Any]]

# Sections whose ``params`` belong to the named builder: switching the name drops the base's
# params, which were written for the other builder and would fail its params dataclass.
_NAMED_SECTIONS = ("model", "regime")


def get_space(name: str) -> SpaceFn:
    """The registered space function ``name``.

    Raises:
        UnknownNameError: (a KeyError) listing the registered spaces.
    """
    return SEARCH_SPACES.get(name)


def space_names() -> list:
    """Sorted names of the registered spaces."""
    return SEARCH_SPACES.names()


def nest_sample(sample: Mapping[str, Any]) -> Dict[str, Any]:
    """Turn ``{"a/b/c": v}`` keys (and already-nested dicts) into one nested dict.

    Raises:
        ValueError: a path that runs through a value that is not a mapping
            (``{"a": 1, "a/b": 2}``).
    """
    out: Dict[str, Any] = {}
    for key, value in sample.items():
        parts = [p for p in str(key).split("/") if p]
        if not parts:
            raise ValueError(f"empty sample key {key!r}")
        if isinstance(value, Mapping):
            value = nest_sample(value)
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"sample key {key!r} runs through the non-mapping value at {p!r}")
            node = nxt
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            _deep_merge(node[leaf], value)
        else:
            node[leaf] = value
    return out


def flatten_sample(sample: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Inverse of `nest_sample`: nested dicts become ``"a/b/c"`` keys (lists stay values)."""
    out: Dict[str, Any] = {}
    for key, value in sample.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_sample(value, path))
        else:
            out[path] = value
    return out


def apply_sample(cfg_dict: Mapping[str, Any], sample: Mapping[str, Any]) -> Dict[str, Any]:
    """Merge a sampled point into a config dict (the input is not modified).

    Mappings merge key by key at any depth; any other value (numbers, strings, lists)
    replaces the base value. When the sample names a different backbone (``model/name``) or
    regime (``regime/name``) than the base, the base's ``params`` of that section are dropped
    first: they belong to the other builder.

    Args:
        cfg_dict: A config dict (``ExperimentConfig.to_dict()`` or parsed YAML).
        sample: The sampled point, flat ``"a/b"`` keys, nested dicts, or a mix.

    Returns:
        A new dict; validate it with ``ExperimentConfig.from_dict``.
    """
    out = copy.deepcopy(dict(cfg_dict))
    nested = nest_sample(sample)
    for section in _NAMED_SECTIONS:
        new = nested.get(section)
        old = out.get(section)
        if isinstance(new, dict) and isinstance(old, dict) and "name" in new and new["name"] != old.get("name"):
            old["params"] = {}
    _deep_merge(out, nested)
    return out


def _deep_merge(dst: Dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


# Registration happens on import; imported last so the helpers above exist for them.
from search_spaces import backbones, demo, regimes, tiny  # noqa: E402,F401

__all__ = ["SpaceFn", "apply_sample", "flatten_sample", "get_space", "nest_sample", "space_names"]
