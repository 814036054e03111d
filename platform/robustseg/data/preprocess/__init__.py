"""Invertible preprocessing plans: ``cmr`` (cardiac MR), ``ct`` (lung CT), ``slices2d``.

A plan turns a `Case` in its original geometry into a fixed-size, normalised case for the
network, and returns a JSON-serialisable ``record`` holding everything needed to put a
prediction back on the original grid. Plans are small classes registered in `PLANS` with
their params dataclass; they share helpers (`geometry`, `_common`) as functions and never
inherit from each other.

Typical use::

    plan = build_plan(cfg.data)
    pre, record = plan.preprocess(case)                 # record -> next to the shards
    pred = model(pre.image)                             # (Z, Hc, Wc) labels
    mask = plan.invert_label(pred, record)              # original shape, uint8

The record keys are listed in `robustseg.data.preprocess._common`; which round trips are
exact is explained in `robustseg.data.preprocess.geometry`.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

from robustseg.config import DataConfig, from_dict
from robustseg.data.cases import Case
from robustseg.errors import ConfigError
from robustseg.registry import PLANS


@runtime_checkable
class Plan(Protocol):
    """What every registered plan provides (duck-typed; no base class)."""

    name: str
    version: int
    params: Any

    def preprocess(self, case: Case, centre_yx: Optional[Sequence[float]] = None) -> Tuple[Case, Dict[str, Any]]:
        """Preprocess one case; returns the new case and its inversion record."""

    def invert_label(self, label_zyx: np.ndarray, record: Dict[str, Any]) -> np.ndarray:
        """Labels in preprocessed space -> uint8 labels on the original grid."""

    def invert_probabilities(self, probs_czyx: np.ndarray, record: Dict[str, Any]) -> np.ndarray:
        """Probabilities ``(C, Z, Hc, Wc)`` -> ``(C, Z, Y, X)`` on the original grid."""

    def to_dict(self) -> Dict[str, Any]:
        """``{"name", "version", "params"}`` for ``plan.json``."""


def build_plan(data_cfg: DataConfig) -> Plan:
    """Build the plan named by ``data_cfg.plan`` with its params section.

    Args:
        data_cfg: The ``data`` config section (``plan`` names the section to use:
            ``data.cmr``, ``data.ct`` or ``data.slices2d``).

    Returns:
        The plan instance.

    Raises:
        KeyError: unknown plan name (lists the registered ones).
    """
    cls = PLANS.get(data_cfg.plan)
    return cls(getattr(data_cfg, data_cfg.plan))


def plan_from_dict(d: Mapping[str, Any]) -> Plan:
    """Rebuild a plan from its `to_dict` form (e.g. a ``plan.json`` next to a model).

    Args:
        d: ``{"name", "version", "params"}``.

    Returns:
        The plan instance.

    Raises:
        ConfigError: unknown params keys, invalid values, or a version this code does not
            produce (its records might not invert correctly).
    """
    name = str(d.get("name", ""))
    cls = PLANS.get(name)
    if int(d.get("version", -1)) != cls.version:
        raise ConfigError(f"plan {name!r} version {d.get('version')!r} is not supported (this code writes version {cls.version})")
    params = from_dict(PLANS.meta(name)["params"], d.get("params", {}), prefix=f"plan.{name}")
    return cls(params)


# Importing the plan modules registers them; they import only the helpers above.
from robustseg.data.preprocess import cmr, ct, slices2d  # noqa: E402,F401
from robustseg.data.preprocess.ct import lung_mask  # noqa: E402

__all__ = ["Plan", "build_plan", "plan_from_dict", "lung_mask", "PLANS"]
