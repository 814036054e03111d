"""The ensemble as an MLflow pyfunc model.

Artifacts: the ensemble folder (``spec.json`` + slim member checkpoints with their configs and
preprocessing plans). Code: this package, shipped with ``code_paths``, so a registered version
loads without robustseg installed. The pyfunc input is one volume as named tensors:

* ``image``: float32 ``(Z, Y, X)`` in the scanner's intensities;
* ``spacing``: float64 ``(3,)`` voxel size ``(x, y, z)`` in mm (all zeros: unknown spacing).

The output is the uint8 label map ``(Z, Y, X)`` on the input grid. Serving code that needs
the input's full geometry or several volumes per call uses ``unwrap_python_model().ensemble``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import mlflow
import numpy as np

#: The artifact key of the ensemble folder.
ARTIFACT_KEY = "ensemble"
#: Environment variable choosing the inference device of a loaded model ("cpu", "cuda", "cuda:1").
DEVICE_ENV = "ROBUSTSEG_DEVICE"


def case_from_arrays(image: np.ndarray, spacing: Optional[np.ndarray], task: str) -> Any:
    """A validated unlabelled `Case` from pyfunc input arrays."""
    from robustseg.data.cases import Case, validate_case

    sp = np.asarray(spacing if spacing is not None else np.zeros(3), dtype=np.float64).reshape(-1)
    known = sp.size == 3 and bool(np.all(sp > 0))
    case = Case(case_id="input", subject_id="input", image=np.asarray(image, dtype=np.float32),
                spacing=tuple(float(s) for s in sp) if known else (1.0, 1.0, 1.0), spacing_known=known,
                modality="CT" if task.startswith("lung") else "MR", task=task, source_path="pyfunc input")
    return validate_case(case)


class EnsemblePyfunc(mlflow.pyfunc.PythonModel):
    """Loads the ensemble folder artifact onto ``$ROBUSTSEG_DEVICE`` (default CUDA if available)."""

    def load_context(self, context: Any) -> None:
        """Restore the members from the ensemble folder artifact."""
        import torch

        from robustseg.ensemble import Ensemble

        dev = os.environ.get(DEVICE_ENV)
        device = torch.device(dev) if dev else None
        self.ensemble = Ensemble.load(Path(context.artifacts[ARTIFACT_KEY]), device)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would take them as the schema
        """Label map ``(Z, Y, X)`` of one volume (see the module notes for the input)."""
        if not isinstance(model_input, dict) or "image" not in model_input:
            raise ValueError("input must be a dict with an 'image' (Z, Y, X) array and optional 'spacing' (x, y, z)")
        case = case_from_arrays(model_input["image"], model_input.get("spacing"), self.ensemble.spec.task)
        return self.ensemble.predict_cases([case])[0]


def signature() -> Any:
    """Tensor signature: image float32 (Z, Y, X) + spacing float64 (3,) -> uint8 labels (Z, Y, X)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1), "image"),
                     TensorSpec(np.dtype(np.float64), (3,), "spacing")])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "label")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(spacing=(1.5, 1.5, 8.0), shape=(2, 48, 48), seed: int = 0) -> Dict[str, np.ndarray]:
    """A small synthetic volume (a bright disc in noise): a few kB in the model's folder."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.mgrid[:y, :x]
    disc = ((yy - y / 2) ** 2 + (xx - x / 2) ** 2 < (min(y, x) / 5) ** 2).astype(np.float32)
    image = (100 + 300 * disc[None] + rng.normal(0, 10, (z, y, x))).astype(np.float32)
    return {"image": image, "spacing": np.asarray(spacing, dtype=np.float64)}
