"""The fold-by-architecture ensemble: what it is, how it predicts, how MLflow holds it.

- `robustseg.ensemble.model`: `Ensemble`, its spec (``spec.json``) and members; inference.
- `robustseg.ensemble.pyfunc`: the MLflow pyfunc wrapper (imports mlflow; not imported here,
  so ``import robustseg.ensemble`` needs only torch, numpy and SimpleITK).
- `robustseg.ensemble.registry`: log, register, promote, list and load ensembles in MLflow.
- `robustseg.ensemble.pyfunc_entry`: the models-from-code file MLflow copies into a logged model.

Building one from a sweep runs on Ray and lives on the Ray side (``trainables/ensemble_build.py``).
"""
from typing import Any

__all__ = ["CENTRING_MODES", "COMBINE_MODES", "MEMBERS_DIR", "SPEC_FILE", "Ensemble", "EnsembleSpec", "MemberSpec",
           "label_convention"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `robustseg.ensemble.registry` constants are read while the CLI parser is
    # built, and `robustseg --help` must not import torch through `model`.
    if name in __all__:
        from robustseg.ensemble import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
