"""Pseudo labels by cosine similarity in a segmentation encoder's feature space.

The lung CT thesis (Ch. 5.3.4, steps 1-4 of §1.3) labels unlabelled patches without a
second network: a dictionary of labelled patches is encoded by the trained model's encoder
(followed by global average pooling); an unlabelled patch takes the labels of its most
similar dictionary entries, if it is similar enough to trust and not so similar that it
adds nothing:

1. **Boxes.** A coarse model segments every unlabelled slice; the bounding box of its
   foreground, enlarged by 15 px and clipped to the image, is where patches are taken
   (slices without predicted foreground are skipped and counted). Labelled slices use the
   ground-truth box enlarged by 10 px. "Unlabelled" means every slice whose label may not
   be used for training (`SliceSet.labelled` false: no label, or outside the label budget).
2. **Patches.** 68 x 68 patches at random positions in the boxes: 120 for the dictionary,
   32 per unlabelled volume. Only training folds are read: the validation fold (``fold``,
   by default the checkpoint's ``data.val_fold``) contributes neither dictionary entries nor
   unlabelled images, so the fold's validation score stays clean.
3. **Features.** The output of the deepest encoder module (a forward hook; by default the
   last entry of `robustseg.models.transfer.ENCODER_PREFIXES`, e.g. ``net.bottleneck``),
   globally average-pooled and L2-normalised, so a dot product is a cosine similarity.
4. **Assignment.** Keep an unlabelled patch when its best similarity lies in the window
   (thesis Fig. 5.7: [0.87, 0.96]); its soft mask mixes the one-hot label patches of its
   top-2 dictionary entries, weighted by their similarities normalised to sum 1.

The output file (`save_pseudo_labels` / `load_pseudo_labels`) feeds the mean-teacher
regime (``regime.params.pseudo_labels``); `plot_similarity_histogram` redraws Fig. 5.7.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from robustseg.analysis.outputs import jsonable, pyplot, save_figure
from robustseg.config import doc
from robustseg.errors import ConfigError, DataError
from robustseg.engine.precision import inference_amp

#: Keys every pseudo-label file holds (`load_pseudo_labels` checks them).
REQUIRED_KEYS = ("images", "soft", "similarity", "source", "meta")
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


# --------------------------------------------------------------------------- boxes and patches
class Box(NamedTuple):
    """A half-open pixel box ``[y0, y1) x [x0, x1)``."""

    y0: int
    x0: int
    y1: int
    x1: int


def bounding_box(mask: Union[torch.Tensor, np.ndarray], margin: int) -> Optional[Box]:
    """Box of the nonzero pixels of a ``(H, W)`` mask, enlarged by ``margin`` and clipped to the image.

    Returns:
        The box, or None when the mask is empty (no box to sample from).
    """
    m = torch.as_tensor(mask) != 0
    if not bool(m.any()):
        return None
    h, w = m.shape
    ys = m.any(1).nonzero().flatten()
    xs = m.any(0).nonzero().flatten()
    return Box(max(0, int(ys[0]) - margin), max(0, int(xs[0]) - margin),
               min(h, int(ys[-1]) + 1 + margin), min(w, int(xs[-1]) + 1 + margin))


def origin_range(lo: int, hi: int, patch: int, size: int) -> Tuple[int, int]:
    """Inclusive range of patch starts along one axis for a box side ``[lo, hi)``.

    A box side at least ``patch`` long keeps the patch inside the box; a shorter one puts
    the whole box side inside the patch (the patch cannot fit in it, and cutting the box
    would lose the structure the box marks). Both are clipped to the image.

    Raises:
        ValueError: a patch longer than the image.
    """
    if patch > size:
        raise ValueError(f"patch {patch} is larger than the image side {size}")
    first, last = min(lo, hi - patch), max(lo, hi - patch)
    return max(first, 0), min(last, size - patch)


def sample_origins(boxes: Sequence[Tuple[int, Box]], n: int, patch: int, shape: Tuple[int, int],
                   generator: torch.Generator) -> List[Tuple[int, int, int]]:
    """``n`` random patch positions ``(row, y0, x0)`` in some boxes, without duplicates.

    Args:
        boxes: ``(row, box)`` pairs: ``row`` indexes the slice the box belongs to.
        n: Draws; a box is picked uniformly, then a position uniformly in its `origin_range`.
        patch: Patch side.
        shape: Image ``(H, W)``.
        generator: CPU generator (positions do not depend on the device).

    Returns:
        Distinct positions in draw order (fewer than ``n`` when draws coincide).
    """
    if not boxes or n < 1:
        return []
    pick = torch.randint(0, len(boxes), (n,), generator=generator).tolist()
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64).tolist()
    out: Dict[Tuple[int, int, int], None] = {}
    for k, (uy, ux) in zip(pick, u):
        row, b = boxes[k]
        ylo, yhi = origin_range(b.y0, b.y1, patch, shape[0])
        xlo, xhi = origin_range(b.x0, b.x1, patch, shape[1])
        y0 = ylo + min(int(uy * (yhi - ylo + 1)), yhi - ylo)
        x0 = xlo + min(int(ux * (xhi - xlo + 1)), xhi - xlo)
        out[(row, y0, x0)] = None
    return list(out)


def crop(stack: torch.Tensor, origins: Sequence[Tuple[int, int, int]], patch: int) -> torch.Tensor:
    """Patches ``(N, P, P)`` of a ``(S, H, W)`` stack at ``(row, y0, x0)`` positions (gathered at once)."""
    if not origins:
        return stack.new_zeros((0, patch, patch))
    o = torch.tensor(origins, dtype=torch.long, device=stack.device)
    ar = torch.arange(patch, device=stack.device)
    rows = (o[:, 1, None] + ar)[:, :, None]
    cols = (o[:, 2, None] + ar)[:, None, :]
    return stack[o[:, 0, None, None], rows, cols]


# --------------------------------------------------------------------------- features
def default_feature_module(backbone: str) -> str:
    """The deepest encoder module of a backbone: the last of its `ENCODER_PREFIXES`.

    Raises:
        ConfigError: a backbone without registered encoder prefixes.
    """
    from robustseg.models.transfer import ENCODER_PREFIXES

    if backbone not in ENCODER_PREFIXES:
        raise ConfigError(f"no default feature module for backbone {backbone!r} (known: {sorted(ENCODER_PREFIXES)}); "
                          "set feature_module to one of its module names")
    return ENCODER_PREFIXES[backbone][-1].rstrip(".")


class _Encoded(Exception):
    """Raised by the feature hook: the decoder is never run (it may reject patch sizes, and costs time)."""


def encode_patches(model: torch.nn.Module, patches: torch.Tensor, module_name: str, *, batch_size: int = 64,
                   channels_last: bool = False, pad_to: int = 1) -> torch.Tensor:
    """L2-normalised, globally average-pooled encodings ``(N, F)`` of ``(N, 1, P, P)`` patches.

    Args:
        model: A 2D network in eval mode.
        patches: Images in the model's (the store's) normalised intensity space.
        module_name: Module whose output is the encoding (``dict(model.named_modules())``).
        batch_size: Patches per forward pass.
        channels_last: The module returns ``(B, H, W, C)`` tokens instead of ``(B, C, H, W)``.
        pad_to: Pad patches (edge replication) up to a multiple of this for backbones that
            reject other sizes.

    Raises:
        ConfigError: no such module (lists the top-level ones).
    """
    modules = dict(model.named_modules())
    if module_name not in modules:
        top = [n for n, _ in model.named_children()]
        raise ConfigError(f"feature module {module_name!r} not in the model (top-level modules: {top})")
    captured: List[torch.Tensor] = []

    def hook(_mod: Any, _inp: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, (tuple, list)) else out)
        raise _Encoded

    handle = modules[module_name].register_forward_hook(hook)
    device = next(model.parameters()).device
    chunks = []
    try:
        with torch.no_grad():
            for i in range(0, patches.shape[0], batch_size):
                x = patches[i:i + batch_size].to(device=device, dtype=torch.float32)
                if pad_to > 1:
                    ph, pw = (-x.shape[-2]) % pad_to, (-x.shape[-1]) % pad_to
                    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
                captured.clear()
                try:
                    model(x)
                except _Encoded:
                    pass
                if not captured:
                    raise ConfigError(f"feature module {module_name!r} was not run by the model's forward pass")
                feat = captured[0].float()
                pooled = feat.mean(dim=(1, 2)) if channels_last else feat.flatten(2).mean(2)
                chunks.append(F.normalize(pooled, dim=1).cpu())
    finally:
        handle.remove()
    if not chunks:
        return torch.zeros(0, 0)  # no patches: `assign_soft_labels` takes the width from the dictionary
    return torch.cat(chunks)


# --------------------------------------------------------------------------- assignment
@dataclass
class Assignment:
    """What the similarity window and the top-k mix decided for every unlabelled patch.

    Attributes:
        best: ``(U,)`` best cosine similarity of each unlabelled patch.
        keep: ``(U,)`` best similarity inside the window.
        too_similar: ``(U,)`` best similarity above the window.
        too_dissimilar: ``(U,)`` best similarity below the window.
        index: ``(U, k)`` dictionary entries, most similar first.
        weight: ``(U, k)`` mixing weights (sum 1 per row; 0 for entries below the window).
        soft: ``(K, C, P, P)`` soft masks of the kept patches, in ``keep`` order.
    """

    best: torch.Tensor
    keep: torch.Tensor
    too_similar: torch.Tensor
    too_dissimilar: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    soft: torch.Tensor


def centre_codes(unlabelled: torch.Tensor, dictionary: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Subtract the dictionary's mean encoding from both sides and re-normalise to unit length.

    Pooled post-activation features are (nearly) non-negative, so their raw cosines crowd
    just below 1 whatever the content; measured on COVID-SemiSeg with the unet2d bottleneck:
    median best similarity 0.998, so the thesis window kept nothing. Centring on the labelled
    dictionary measures how a patch differs from the typical labelled patch, which spreads
    the similarities over [-1, 1] and makes a fixed window meaningful.
    """
    mean = dictionary.float().mean(0, keepdim=True)
    return F.normalize(unlabelled.float() - mean, dim=1), F.normalize(dictionary.float() - mean, dim=1)


def assign_soft_labels(unlabelled: torch.Tensor, dictionary: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       window: Sequence[float] = (0.87, 0.96), top_k: int = 2) -> Assignment:
    """Window-filter unlabelled patches and mix their top-k dictionary labels.

    Args:
        unlabelled: ``(U, F)`` L2-normalised encodings.
        dictionary: ``(M, F)`` L2-normalised encodings of the labelled patches.
        labels: ``(M, P, P)`` integer label patches of the dictionary.
        num_classes: C, background included.
        window: ``(low, high)``, inclusive.
        top_k: Entries mixed (capped at M); those below ``low`` get weight 0 (the best,
            inside the window for a kept patch, always counts).

    Raises:
        ValueError: an empty dictionary, mismatched shapes, or labels outside ``[0, C)``.
    """
    if dictionary.shape[0] == 0:
        raise ValueError("the dictionary is empty")
    if unlabelled.shape[0] == 0:
        unlabelled = dictionary.new_zeros(0, dictionary.shape[1])
    if dictionary.shape[0] != labels.shape[0] or unlabelled.shape[1] != dictionary.shape[1]:
        raise ValueError(f"shapes do not match: unlabelled {tuple(unlabelled.shape)}, dictionary "
                         f"{tuple(dictionary.shape)}, labels {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"dictionary labels must lie in [0, {num_classes}), "
                         f"got {int(labels.min())}..{int(labels.max())}")
    low, high = float(window[0]), float(window[1])
    k = min(top_k, dictionary.shape[0])
    sims = unlabelled.float() @ dictionary.float().T  # cosine: both sides are unit vectors
    top, index = sims.topk(k, dim=1)
    best = top[:, 0]
    trusted = top >= low
    trusted[:, 0] = True  # the best entry decides the window; it always takes part
    raw = torch.where(trusted, top.clamp(min=0), torch.zeros_like(top))
    # A best similarity <= 0 is only kept by a window reaching that low: it takes the top-1 label alone.
    raw[:, 0] = torch.where(raw.sum(1) > 0, raw[:, 0], torch.ones_like(raw[:, 0]))
    weight = raw / raw.sum(1, keepdim=True)
    keep = (best >= low) & (best <= high)
    p = labels.shape[-1]
    soft = torch.zeros(int(keep.sum()), num_classes, labels.shape[-2], p)
    for j in range(k):
        hot = F.one_hot(labels[index[keep, j]].long(), num_classes).permute(0, 3, 1, 2).float()
        soft += weight[keep, j, None, None, None] * hot
    return Assignment(best=best, keep=keep, too_similar=best > high, too_dissimilar=best < low, index=index,
                      weight=weight, soft=soft)


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
    """Run the whole pipeline (module notes) on a prepared store.

    Args:
        checkpoint: The coarse model (``best.pt``), trained on this store's plan.
        data: Store URI or its ``manifest.json``.
        params: Options (defaults: the thesis's).
        device: Inference device (default CUDA if available).
        progress: tqdm-like factory over the unlabelled cases.

    Raises:
        CheckpointError: an unusable checkpoint, or one trained with another preprocessing plan.
        ConfigError: a fold out of range, a patch larger than the slices, a 3D feature encoder.
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


# --------------------------------------------------------------------------- files
def save_pseudo_labels(data: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Write a pseudo-label file (``torch.save``), after checking it as `load_pseudo_labels` would.

    An empty set (no patch in the window) is written too, so its summary can be inspected,
    but `load_pseudo_labels` refuses it.
    """
    path = Path(path)
    check_pseudo_labels(data, path, allow_empty=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)  # readers never see half a file
    return path


def check_pseudo_labels(data: Any, where: Union[str, Path], *, allow_empty: bool = False) -> None:
    """Validate the pseudo-label format.

    Format: ``images`` float32 ``(N, 1, P, P)`` (store intensities), ``soft`` float32
    ``(N, C, P, P)`` (non-negative, sums 1 over C), ``similarity`` ``(N,)``, ``source`` N
    ``(case_id, y0, x0)``, ``meta`` dict; optionally ``slice_index`` ``(N,)``.

    Raises:
        DataError: naming ``where``: a missing key or a shape, type or sum that does not fit.
    """
    if not isinstance(data, dict):
        raise DataError(where, f"not a pseudo-label file (a {type(data).__name__}, expected a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DataError(where, f"not a pseudo-label file: missing keys {missing} (expected {list(REQUIRED_KEYS)})")
    images, soft, sim = data["images"], data["soft"], data["similarity"]
    for key, t in (("images", images), ("soft", soft), ("similarity", sim)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise DataError(where, f"{key} must be a float tensor, got {type(t).__name__}")
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise DataError(where, f"images must be (N, 1, P, P), got {tuple(images.shape)}")
    n, p = images.shape[0], images.shape[2]
    if soft.dim() != 4 or soft.shape[0] != n or soft.shape[2:] != images.shape[2:] or soft.shape[1] < 2:
        raise DataError(where, f"soft must be (N={n}, C>=2, {p}, {p}) like images, got {tuple(soft.shape)}")
    if tuple(sim.shape) != (n,):
        raise DataError(where, f"similarity must be ({n},), got {tuple(sim.shape)}")
    if not isinstance(data["source"], (list, tuple)) or len(data["source"]) != n:
        raise DataError(where, f"source must list {n} (case_id, y0, x0) entries")
    if "slice_index" in data and tuple(torch.as_tensor(data["slice_index"]).shape) != (n,):
        raise DataError(where, f"slice_index must be ({n},)")
    if not isinstance(data["meta"], dict):
        raise DataError(where, "meta must be a dict")
    if n == 0 and not allow_empty:
        raise DataError(where, "holds no pseudo labels (no unlabelled patch fell in the similarity window)")
    if n and (float(soft.min()) < -1e-6 or not torch.allclose(soft.sum(1), torch.ones(()), atol=1e-4)):
        raise DataError(where, "soft masks must be non-negative and sum to 1 over the classes")


def load_pseudo_labels(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and validate a pseudo-label file (see `check_pseudo_labels` for the format).

    Raises:
        DataError: naming the file: missing, unreadable, empty, or not in the format.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "pseudo-label file not found (write it with `robustseg pseudo-label`)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike mean "not our file"
        raise DataError(path, f"unreadable pseudo-label file ({type(e).__name__}: {e})") from None
    check_pseudo_labels(data, path)
    return data


# --------------------------------------------------------------------------- report
def plot_similarity_histogram(best: torch.Tensor, window: Sequence[float], path: Union[str, Path],
                              bins: int = 50) -> Path:
    """Histogram of the best similarities with the kept window shaded (thesis Fig. 5.7)."""
    plt = pyplot()
    values = best.double().numpy()
    low, high = float(window[0]), float(window[1])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    lo = min(float(values.min()) if values.size else low, low) - 0.01
    hi = max(1.0, float(values.max()) if values.size else 1.0)  # float error can give 1 + eps
    ax.hist(values, bins=np.linspace(lo, hi, bins + 1), color="#4c72b0", edgecolor="white", linewidth=0.4)
    kept = int(((values >= low) & (values <= high)).sum())
    ax.axvspan(low, high, color="#55a868", alpha=0.2, label=f"kept [{low:g}, {high:g}]: {kept}/{values.size}")
    for v in (low, high):
        ax.axvline(v, color="#55a868", linestyle="--", linewidth=1)
    ax.set_xlabel("best cosine similarity to the labelled dictionary")
    ax.set_ylabel("unlabelled patches")
    ax.set_title("Cosine similarity of unlabelled patches (cf. thesis Fig. 5.7)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(result: PseudoLabelResult, out: Union[str, Path]) -> Dict[str, Path]:
    """Write the pseudo-label file, ``<stem>_similarity.png`` and ``<stem>_summary.json`` beside it.

    Returns:
        ``{"labels", "histogram", "summary"}`` paths.
    """
    out = Path(out)
    stem = out.name[: -len(".pt")] if out.name.endswith(".pt") else out.name
    labels = save_pseudo_labels(result.data, out)
    window = result.summary["params"]["window"]
    hist = plot_similarity_histogram(result.best_similarity, window, out.with_name(f"{stem}_similarity.png"))
    summary = out.with_name(f"{stem}_summary.json")
    summary.write_text(json.dumps(jsonable({**result.summary, "output": str(labels)}), indent=1))
    return {"labels": labels, "histogram": hist, "summary": summary}


__all__ = ["REQUIRED_KEYS", "Assignment", "Box", "PseudoLabelParams", "PseudoLabelResult", "assign_soft_labels",
           "bounding_box", "check_pseudo_labels", "crop", "default_feature_module", "encode_patches",
           "generate_pseudo_labels", "load_pseudo_labels", "origin_range", "plot_similarity_histogram",
           "sample_origins", "save_pseudo_labels", "similarity_stats", "write_outputs"]
