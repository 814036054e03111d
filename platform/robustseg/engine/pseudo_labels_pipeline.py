"""Pseudo labels end to end on a prepared store: options, models, patches, features, assignment.

`generate_pseudo_labels` runs steps 1-4 of `robustseg.engine.pseudo_labels` with the options
of `PseudoLabelParams`: the coarse model's boxes on the unlabelled slices, the dictionary from
the training-labelled ones (the validation fold left out), their encodings, and the soft
labels; it returns the file content with a summary (`PseudoLabelResult`), which
`robustseg.engine.pseudo_labels_files` writes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from robustseg.config import doc
from robustseg.engine.precision import inference_amp
from robustseg.engine.pseudo_labels_features import (assign_soft_labels, centre_codes, default_feature_module,
                                                     encode_patches)
from robustseg.engine.pseudo_labels_patches import bounding_box, crop, sample_origins
from robustseg.errors import ConfigError, DataError

#: Backbones whose token layout is ``(B, H, W, C)`` after their encoder (pooled over H, W).
_CHANNELS_LAST = frozenset({"swin_unet"})
#: Backbones that reject inputs off their size multiple: patches are padded for them only,
#: since padding adds border content that shifts a convolutional encoder's pooled features.
_PAD_INPUT = frozenset({"swin_unet", "swin_unetr"})


@dataclass
class PseudoLabelParams:
    """Options of the cosine-similarity pseudo labelling (thesis Ch. 5.3.4)."""

    patch_size: int = doc(68, "Square patch side in store pixels (thesis §1.3 step 2: 68 x 68).")
    window: List[float] = doc([0.87, 0.96], "Keep an unlabelled patch when its best cosine similarity s satisfies "
                                            "low <= s <= high (thesis §5.3.4, Fig. 5.7: [0.87, 0.96]); above: "
                                            "redundant with the dictionary, below: label unreliable.")
    top_k: int = doc(2, "Dictionary entries mixed into a soft mask (thesis §1.3 step 3: the top two). An entry "
                        "below the window's low bound is left out of the mix (thesis §1.3: 'only if both scores' "
                        "pass), so a kept patch never takes labels from a patch it would not trust alone.")
    dictionary_size: int = doc(120, "Labelled patches in the dictionary (thesis §1.3 step 2: 120), drawn from the "
                                    "training-labelled slices with foreground; duplicates are dropped.")
    per_case: int = doc(32, "Patches drawn per unlabelled case (thesis §1.3 step 2: 32 per volume), from its "
                            "slices with a box, uniformly over slices then positions; duplicates are dropped.")
    labelled_margin: int = doc(10, "Pixels added on each side of a ground-truth box (thesis §5.3.4: 10).")
    unlabelled_margin: int = doc(15, "Pixels added on each side of a predicted box (thesis §5.3.4: 15; wider because "
                                     "the coarse model's extent is uncertain).")
    fold: Optional[int] = doc(None, "Validation fold left out entirely (dictionary and unlabelled images); "
                                    "null: the checkpoint's data.val_fold.")
    max_unlabelled_cases: Optional[int] = doc(None, "Use at most this many unlabelled cases (store order; quick "
                                                    "runs); null: all.")
    feature_module: str = doc("", "Module whose output is the encoding; empty: the backbone's deepest encoder "
                                  "module (last ENCODER_PREFIXES entry, e.g. net.bottleneck for unet2d).")
    encoder: str = doc("", "Checkpoint whose encoder gives the features (the thesis used its fine-tuned 2D model "
                           "with a coarse 3D model for the boxes); empty: the coarse model itself. Must be 2D.")
    centre_features: bool = doc(True, "Centre the encodings on the dictionary's mean before the cosine (see "
                                      "`centre_codes`): the thesis does not say; raw pooled ReLU features all score "
                                      "~0.998 here, so its window would keep nothing.")
    tta: bool = doc(False, "Mirror TTA for the coarse segmentation (off: a box needs no refinement, 4x cheaper).")
    batch_size: int = doc(64, "Patches per encoder forward pass.")
    seed: int = doc(0, "Seed of the patch positions (the same seed and store give the same patches).")

    def __post_init__(self) -> None:
        if self.patch_size < 8:
            raise ConfigError(f"pseudo_labels.patch_size must be >= 8, got {self.patch_size}")
        if len(self.window) != 2 or not -1.0 <= float(self.window[0]) <= float(self.window[1]) <= 1.0:
            raise ConfigError("pseudo_labels.window must be [low, high] with -1 <= low <= high <= 1, "
                              f"got {self.window}")
        self.window = [float(self.window[0]), float(self.window[1])]
        if self.top_k < 1 or self.dictionary_size < 1 or self.per_case < 1 or self.batch_size < 1:
            raise ConfigError("pseudo_labels.top_k, dictionary_size, per_case and batch_size must be >= 1")
        if self.labelled_margin < 0 or self.unlabelled_margin < 0:
            raise ConfigError("pseudo_labels.labelled_margin and unlabelled_margin must be >= 0")
        if self.max_unlabelled_cases is not None and self.max_unlabelled_cases < 1:
            raise ConfigError("pseudo_labels.max_unlabelled_cases must be >= 1 or null, "
                              f"got {self.max_unlabelled_cases}")


# --------------------------------------------------------------------------- pipeline
@dataclass
class PseudoLabelResult:
    """Output of `generate_pseudo_labels`.

    Attributes:
        data: The file content (see `save_pseudo_labels`).
        best_similarity: ``(U,)`` best similarity of every unlabelled patch, kept or not.
        summary: Counts, similarity statistics and the provenance (JSON-ready).
    """

    data: Dict[str, Any]
    best_similarity: torch.Tensor
    summary: Dict[str, Any] = field(default_factory=dict)


def _store_uri(data: str) -> str:
    from robustseg.data.manifest import MANIFEST

    return data[: -len(MANIFEST)].rstrip("/") if str(data).endswith(MANIFEST) else str(data)


def _case_rows(case_ids: Sequence[str], slice_index: torch.Tensor) -> Dict[str, List[int]]:
    """Rows of each case in slice order, cases in store order."""
    rows: Dict[str, List[int]] = {}
    for i, cid in enumerate(case_ids):
        rows.setdefault(cid, []).append(i)
    order = slice_index.cpu()
    return {cid: sorted(r, key=lambda i: int(order[i])) for cid, r in rows.items()}


def _predicted_foreground(pred: Any, image_zyx: torch.Tensor, tta: bool) -> torch.Tensor:
    """``(Z, H, W)`` bool: the coarse model's foreground (any class > 0) on the store grid.

    No post-processing: infection is multifocal, and keeping the largest component would
    drop lesions from the box.
    """
    from robustseg.engine.inference import predict_volume
    from robustseg.models import size_multiple

    inf = pred.cfg.inference
    with torch.no_grad():
        probs = predict_volume(pred.model, image_zyx.float(), spatial_dims=pred.spatial_dims,
                               num_classes=pred.cfg.model.num_classes, patch_size=pred.patch_size,
                               overlap=inf.overlap, gaussian=inf.gaussian, tta=tta, batch_size=inf.batch_size,
                               divisible_by=size_multiple(pred.model), amp=inference_amp(pred.device))
    return probs.argmax(0) > 0


def _feature_model(pred: Any, params: PseudoLabelParams) -> Tuple[str, bool, int]:
    """Module name, channels-last flag and input multiple of the encoder used for features."""
    from robustseg.models import size_multiple

    name = pred.cfg.model.name
    if pred.spatial_dims != 2:
        raise ConfigError(f"{pred.source}: the feature encoder must be a 2D model (got {name}, 3D); "
                          "pass a 2D checkpoint as the encoder")
    if pred.cfg.model.slice_context:
        raise ConfigError(f"{pred.source}: the feature encoder takes {1 + 2 * pred.cfg.model.slice_context} slices "
                          "(model.slice_context); the dictionary's patches are single slices: pass a plain 2D "
                          "checkpoint as the encoder")
    module = params.feature_module or default_feature_module(name)
    pad = max(size_multiple(pred.model)) if name in _PAD_INPUT else 1
    return module, name in _CHANNELS_LAST, pad


def _load_models(checkpoint: Union[str, Path], manifest: Any, params: PseudoLabelParams,
                 device: Optional[torch.device]) -> Tuple[Any, Any]:
    """The coarse model and the feature encoder (the same one unless ``params.encoder``).

    Both must have been trained on the store's plan (its intensities are what they saw) and
    on its label set.
    """
    from robustseg.engine.predict import load_predictor

    pred = load_predictor(checkpoint, device, plan=manifest.plan)
    enc = load_predictor(params.encoder, pred.device, plan=manifest.plan) if params.encoder else pred
    for p in (pred, enc):
        if p.task != manifest.task or int(p.cfg.model.num_classes) != len(manifest.class_names):
            raise DataError(manifest.uri, f"holds {manifest.task} with {len(manifest.class_names)} classes; "
                            f"{p.source} segments {p.task} with {p.cfg.model.num_classes}")
    return pred, enc


def _dictionary_origins(slices: Any, params: PseudoLabelParams, shape: Tuple[int, int],
                        generator: torch.Generator) -> Tuple[List[Tuple[int, int, int]], Dict[str, int]]:
    """Dictionary patch positions in the ground-truth boxes of training-labelled slices, and counts."""
    rows = slices.labelled.nonzero().flatten().cpu().tolist()
    boxes = [(r, b) for r in rows if (b := bounding_box(slices.labels[r], params.labelled_margin))]
    origins = sample_origins(boxes, params.dictionary_size, params.patch_size, shape, generator)
    return origins, {"labelled_slices": len(rows), "labelled_boxes": len(boxes),
                     "skipped_labelled_slices": len(rows) - len(boxes), "dictionary": len(origins)}


def _unlabelled_origins(pred: Any, slices: Any, params: PseudoLabelParams, shape: Tuple[int, int],
                        generator: torch.Generator, progress: Optional[Callable[..., Any]]
                        ) -> Tuple[List[Tuple[int, int, int]], Dict[str, int]]:
    """Unlabelled patch positions in the coarse model's boxes, case by case, and counts.

    A case with any unlabelled slice is segmented whole (a 3D model needs the volume); only
    its unlabelled slices give boxes.
    """
    unlabelled = (~slices.labelled).cpu()
    rows_by_case = _case_rows(slices.case_ids, slices.slice_index)
    cases = [c for c, rows in rows_by_case.items() if bool(unlabelled[rows].any())]
    cases = cases[: params.max_unlabelled_cases] if params.max_unlabelled_cases else cases
    origins: List[Tuple[int, int, int]] = []
    n_slices = n_boxes = 0
    for cid in (progress(cases, desc="pseudo-label", unit="case") if progress else cases):
        rows = rows_by_case[cid]
        fg = _predicted_foreground(pred, slices.images[rows], params.tta)
        boxes = [(r, b) for r, m in zip(rows, fg) if unlabelled[r] and (b := bounding_box(m, params.unlabelled_margin))]
        n_slices, n_boxes = n_slices + int(unlabelled[rows].sum()), n_boxes + len(boxes)
        origins += sample_origins(boxes, params.per_case, params.patch_size, shape, generator)
    return origins, {"unlabelled_cases": len(cases), "unlabelled_slices": n_slices, "unlabelled_boxes": n_boxes,
                     "skipped_slices": n_slices - n_boxes, "patches": len(origins)}


def generate_pseudo_labels(checkpoint: Union[str, Path], data: str, params: Optional[PseudoLabelParams] = None, *,
                           device: Optional[torch.device] = None,
                           progress: Optional[Callable[..., Any]] = None) -> PseudoLabelResult:
    """Run the whole pipeline (the notes of `robustseg.engine.pseudo_labels`) on a prepared store.

    Args:
        checkpoint: The coarse model (``best.pt``), trained on this store's plan.
        data: Store URI or its ``manifest.json``.
        params: Options (defaults: the thesis's).
        device: Inference device (default CUDA if available).
        progress: tqdm-like factory over the unlabelled cases.

    Raises:
        CheckpointError: an unusable checkpoint, or one trained with another preprocessing plan.
        ConfigError: a fold out of range, a patch larger than the slices, a 3D or 2.5D feature encoder.
        DataError: classes that differ from the store's, no labelled foreground for the
            dictionary, or no unlabelled slices.
    """
    from robustseg.data.manifest import read_manifest
    from robustseg.data.storage import open_store
    from robustseg.engine.data import load_slice_set

    params = params or PseudoLabelParams()
    store = open_store(_store_uri(data))
    manifest = read_manifest(store)
    pred, enc = _load_models(checkpoint, manifest, params, device)
    module, channels_last, pad_to = _feature_model(enc, params)
    k = int(manifest.folds["k"])
    fold = pred.cfg.data.val_fold if params.fold is None else params.fold
    if not 0 <= fold < k:
        raise ConfigError(f"fold {fold}: {manifest.uri} has folds 0..{k - 1}")
    slices = load_slice_set(store, manifest, exclude_folds=[fold], device=pred.device)
    shape = (int(slices.images.shape[1]), int(slices.images.shape[2]))
    if params.patch_size > min(shape):
        raise ConfigError(f"patch size {params.patch_size} exceeds the store's slices {shape[0]}x{shape[1]}")
    generator = torch.Generator().manual_seed(params.seed)
    dict_origins, dict_counts = _dictionary_origins(slices, params, shape, generator)
    if not dict_origins:
        raise DataError(manifest.uri, f"no training-labelled slice with foreground outside fold {fold}: "
                        "nothing to build the dictionary from")
    unl_origins, unl_counts = _unlabelled_origins(pred, slices, params, shape, generator, progress)
    if not unl_counts["unlabelled_cases"]:
        raise DataError(manifest.uri, f"no unlabelled slices outside fold {fold} (no unlabelled source and no label "
                        "budget): nothing to pseudo-label")

    def encode(origins: List[Tuple[int, int, int]]) -> torch.Tensor:
        return encode_patches(enc.model, crop(slices.images, origins, params.patch_size)[:, None], module,
                              batch_size=params.batch_size, channels_last=channels_last, pad_to=pad_to)

    dict_labels = crop(slices.labels, dict_origins, params.patch_size).cpu()
    unl_codes, dict_codes = encode(unl_origins), encode(dict_origins)
    if params.centre_features:
        unl_codes, dict_codes = centre_codes(unl_codes, dict_codes)
    result = assign_soft_labels(unl_codes, dict_codes, dict_labels,
                                int(pred.cfg.model.num_classes), params.window, params.top_k)
    kept = [unl_origins[i] for i in result.keep.nonzero().flatten().tolist()]
    counts = {**unl_counts, **dict_counts, "kept": len(kept), "too_similar": int(result.too_similar.sum()),
              "too_dissimilar": int(result.too_dissimilar.sum())}
    meta = {"params": dataclasses.asdict(params), "checkpoint": str(checkpoint), "encoder": enc.source,
            "feature_module": module, "store": manifest.uri, "fold": fold,
            "checkpoint_val_fold": pred.cfg.data.val_fold, "task": manifest.task, "class_names": manifest.class_names,
            "counts": counts}
    file = {
        "images": crop(slices.images, kept, params.patch_size)[:, None].float().cpu().contiguous(),
        "soft": result.soft.contiguous(),
        "similarity": result.best[result.keep].contiguous(),
        "source": [(slices.case_ids[row], y0, x0) for row, y0, x0 in kept],
        # Beyond (case_id, y0, x0): the slice, so a patch can be found again in the store.
        "slice_index": torch.tensor([int(slices.slice_index[row]) for row, _, _ in kept], dtype=torch.long),
        "meta": meta,
    }
    return PseudoLabelResult(file, result.best, {**meta, "similarity": similarity_stats(result.best)})


def similarity_stats(best: torch.Tensor) -> Dict[str, Optional[float]]:
    """Mean, median, min and max of the best similarities (None when there are none)."""
    if best.numel() == 0:
        return {"mean": None, "median": None, "min": None, "max": None}
    b = best.double()
    return {"mean": float(b.mean()), "median": float(b.median()), "min": float(b.min()), "max": float(b.max())}



__all__ = ["PseudoLabelParams", "PseudoLabelResult", "generate_pseudo_labels", "similarity_stats"]
