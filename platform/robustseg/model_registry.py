"""The ensemble as an MLflow pyfunc model, the model registry, and loading by URI."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from robustseg.ensemble import SPEC_FILE, Ensemble


def load_ensemble(model_uri: str, tracking_uri: Optional[str] = None,
                  device: Optional[torch.device] = None) -> Tuple[Ensemble, Dict[str, Any]]:
    """Load an ensemble from a folder (`Ensemble.save`) or an MLflow model URI.

    Args:
        model_uri: An ensemble folder, or ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
            ``runs:/<run>/<path>`` (MLflow).
        tracking_uri: MLflow tracking URI for ``models:/`` and ``runs:/`` URIs.
        device: Inference device (default CUDA if available).

    Returns:
        The ensemble and a dict describing where it came from: ``uri``, and for registered
        models ``name``, ``version``, ``alias``.
    """
    p = Path(model_uri)
    if (p / SPEC_FILE).is_file():
        return Ensemble.load(p, device), {"uri": str(p), "name": "", "version": "", "alias": ""}
    raise NotImplementedError("MLflow URIs: coming next")
