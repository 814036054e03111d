"""Old import path of `robustseg.ensemble.pyfunc`, kept for ensembles logged before the move.

MLflow copies ``pyfunc_entry.py`` into every logged model; the copies in existing registries
import ``robustseg.ensemble_pyfunc``, so this name must keep resolving.
"""
from robustseg.ensemble.pyfunc import EnsemblePyfunc  # noqa: F401

__all__ = ["EnsemblePyfunc"]
