"""Training data straight from shards onto the training device, with no loader processes.

Small-data segmentation sets fit in device memory (the whole ACDC set is ~200 MB as fp16),
so a fold is decoded once with pyarrow, moved to the device, and every batch is sampled,
cropped and (later) augmented there by vectorised tensor indexing. One CPU process feeds the
GPU; nothing is re-read or re-decoded per epoch. nnU-Net's foreground oversampling is kept: a
third of each batch comes from slices (or slabs) that contain foreground.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from robustseg.data.manifest import Manifest, load_slices
from robustseg.errors import ConfigError
from robustseg.data.shards import decode_images, decode_labels
from robustseg.data.storage import ObjectStore

_META_COLUMNS = ["case_id", "slice_index", "n_slices", "has_label", "train_labelled", "classes_present",
                 "motion_level", "dataset", "phase", "spacing_x", "spacing_y", "spacing_z"]


@dataclass
class SliceSet:
    """Decoded slices of some folds, resident on one device.

    Attributes:
        images: ``(N, H, W)`` (fp16 on CUDA, fp32 on CPU).
        labels: ``(N, H, W)`` uint8 (zeros where a slice has no label).
        labelled: ``(N,)`` bool: the label may be used for training (label budget applied).
        foreground: ``(N,)`` bool: the label has any foreground class.
        case_ids: Case id per slice (host list).
        slice_index: ``(N,)`` int64.
        meta: Per-case metadata (spacing, motion level, dataset, phase) keyed by case id.
    """

    images: torch.Tensor
    labels: torch.Tensor
    labelled: torch.Tensor
    foreground: torch.Tensor
    case_ids: List[str]
    slice_index: torch.Tensor
    meta: Dict[str, Dict[str, Any]]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, mask: torch.Tensor) -> "SliceSet":
        """Rows where ``mask`` is true."""
        keep = mask.nonzero().flatten()
        host = keep.cpu().tolist()
        return SliceSet(self.images[keep], self.labels[keep], self.labelled[keep], self.foreground[keep],
                        [self.case_ids[i] for i in host], self.slice_index[keep], self.meta)

    def case_rows(self) -> Dict[str, torch.Tensor]:
        """Each case's rows in slice order (on the data's device), cases in first-seen order."""
        order: Dict[str, List[int]] = {}
        for i, cid in enumerate(self.case_ids):
            order.setdefault(cid, []).append(i)
        out = {}
        for cid, rows in order.items():
            idx = torch.tensor(rows, device=self.images.device)
            out[cid] = idx[torch.argsort(self.slice_index[idx])]
        return out

    def volumes(self) -> List[Dict[str, Any]]:
        """Whole cases (slices in order) for validation: dicts with image, label and metadata."""
        return [{"case_id": cid, "image": self.images[idx].float(), "label": self.labels[idx], **self.meta[cid]}
                for cid, idx in self.case_rows().items()]


def slice_probabilities(data: SliceSet, weights: Mapping[str, float]) -> torch.Tensor:
    """Per-slice sampling probabilities giving each dataset its weight's share of the batches.

    A dataset's share is its weight over the sum of the weights of the datasets present
    (unlisted ones weigh 1), spread evenly over its slices, so a small target set is not
    drowned by a large pre-training pool.

    Raises:
        ConfigError: a weighted dataset that is not in the data, or no positive weight left.
    """
    datasets = [data.meta[c]["dataset"] for c in data.case_ids]
    per_slice = dataset_slice_weights({d: datasets.count(d) for d in set(datasets)}, weights)
    return torch.tensor([per_slice[d] for d in datasets], dtype=torch.float32, device=data.images.device)


def dataset_slice_weights(counts: Mapping[str, int], weights: Mapping[str, float]) -> Dict[str, float]:
    """Relative sampling weight of one slice of each dataset: its dataset's weight over its slice count.

    Shared by the in-memory batcher (as probabilities) and the Ray Data stream (as acceptance
    rates), so both give each dataset the same share of the batches.

    Args:
        counts: Training slices per dataset.
        weights: ``data.sampling_weights`` (unlisted datasets weigh 1).

    Raises:
        ConfigError: a weighted dataset that is not in the data, or no positive weight left.
    """
    present = sorted(d for d, n in counts.items() if n > 0)
    unknown = sorted(set(weights) - set(present))
    if unknown:
        raise ConfigError(f"data.sampling_weights names datasets {unknown} not in the training data {present}")
    per = {d: float(weights.get(d, 1.0)) / counts[d] for d in present}
    if not sum(per.values()) > 0:
        raise ConfigError(f"data.sampling_weights leaves no dataset with a positive weight ({dict(weights)})")
    return per


def load_slice_set(store: ObjectStore, manifest: Manifest, *, folds: Optional[Sequence[int]] = None,
                   exclude_folds: Optional[Sequence[int]] = None, device: torch.device = torch.device("cpu"),
                   case_ids: Optional[Sequence[str]] = None) -> SliceSet:
    """Decode the slices of some folds (or of listed cases) onto ``device``."""
    table = load_slices(store, manifest, folds=folds, exclude_folds=exclude_folds)
    if case_ids is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table.column("case_id"), value_set=__import__("pyarrow").array(list(case_ids))))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    images = torch.from_numpy(decode_images(table, manifest.layout)).to(device=device, dtype=dtype)
    labels = torch.from_numpy(decode_labels(table, manifest.layout)).to(device)
    cols = {c: table.column(c).to_pylist() for c in _META_COLUMNS}
    meta: Dict[str, Dict[str, Any]] = {}
    for i, cid in enumerate(cols["case_id"]):
        if cid not in meta:
            meta[cid] = {"spacing": (cols["spacing_x"][i], cols["spacing_y"][i], cols["spacing_z"][i]),
                         "motion_level": cols["motion_level"][i], "dataset": cols["dataset"][i],
                         "phase": cols["phase"][i], "has_label": cols["has_label"][i]}
    return SliceSet(
        images=images, labels=labels,
        labelled=torch.tensor(cols["train_labelled"], dtype=torch.bool, device=device),
        foreground=torch.tensor([c > 0 for c in cols["classes_present"]], dtype=torch.bool, device=device),
        case_ids=cols["case_id"],
        slice_index=torch.tensor(cols["slice_index"], dtype=torch.int64, device=device),
        meta=meta,
    )


def _crop_starts(size: int, patch: int, n: int, centres: Optional[torch.Tensor], generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """Crop start per sample: uniform, or around given centres (with jitter) when provided."""
    if patch >= size:
        return torch.zeros(n, dtype=torch.long, device=device)
    hi = size - patch
    uniform = torch.randint(0, hi + 1, (n,), generator=generator, device=device)
    if centres is None:
        return uniform
    jitter = torch.randint(-patch // 4, patch // 4 + 1, (n,), generator=generator, device=device)
    return torch.clamp(centres.long() - patch // 2 + jitter, 0, hi)


def context_rows(data: SliceSet, k: int) -> torch.Tensor:
    """Row of each slice's ``k`` neighbours on each side, itself in the middle: ``(N, 1 + 2k)``.

    Neighbours come from the same case by slice index; beyond a volume's ends the end slice
    repeats, as `robustseg.engine.inference.context_stack` does at prediction.
    """
    dev = data.images.device
    out = torch.arange(len(data), dtype=torch.long, device=dev)[:, None].repeat(1, 1 + 2 * k)
    offsets = torch.arange(-k, k + 1, device=dev)
    for m in data.case_rows().values():  # each case's rows in slice order
        pos = (torch.arange(len(m), device=dev)[:, None] + offsets).clamp_(0, len(m) - 1)
        out[m] = m[pos]
    return out


ROW_SETS = ("labelled", "all", "unlabelled")


def row_mask(data: SliceSet, rows: str) -> torch.Tensor:
    """Mask of the slices a batcher samples (see `SliceBatcher`'s ``rows``).

    Raises:
        ValueError: an unknown row set, or none of its slices in the data.
    """
    if rows not in ROW_SETS:
        raise ValueError(f"rows must be one of {ROW_SETS}, got {rows!r}")
    mask = {"labelled": data.labelled, "all": torch.ones_like(data.labelled),
            "unlabelled": ~data.labelled}[rows]
    if not bool(mask.any()):
        raise ValueError(f"no {'' if rows == 'all' else rows + ' '}training slices (check folds, the label budget "
                         "and the sources)")
    return mask


class SliceBatcher:
    """Infinite iterator of 2D training batches sampled on the data's device.

    Args:
        data: Training slices.
        batch_size: Slices per batch.
        patch_size: ``(h, w)`` crop, or None for whole slices.
        generator: Device generator: all sampling randomness comes from it (resumable).
        fg_fraction: Share of each batch drawn from slices containing foreground (labelled
            rows only: other row sets have no usable label to find foreground in).
        dataset_weights: Per-dataset share of the batches (see `slice_probabilities`).
        rows: Which slices are sampled: ``"labelled"`` (training-labelled: supervised
            regimes), ``"all"`` (every slice: self-supervised regimes) or ``"unlabelled"``
            (slices without a usable label: the unlabelled stream of semi-supervised regimes).
        margin: ``(my, mx)`` pixels added on each side of every patch: batches are source
            patches ``(h + 2 my, w + 2 mx)`` centred on the sampled patch (zero image and
            label beyond the slice), for an `Augmenter` with ``out_shape`` = the patch.
        context: Neighbouring slices on each side stacked as image channels (2.5D,
            ``model.slice_context``): images ``(B, 1 + 2 context, h, w)``, the sampled slice
            in the middle; the label is the middle slice's.
        context_dropout: Share of samples whose neighbour channels repeat their own slice.
    """

    def __init__(self, data: SliceSet, batch_size: int, patch_size: Optional[Sequence[int]],
                 generator: torch.Generator, fg_fraction: float = 0.33,
                 dataset_weights: Optional[Mapping[str, float]] = None, rows: str = "labelled",
                 margin: Sequence[int] = (0, 0), context: int = 0, context_dropout: float = 0.0) -> None:
        usable = row_mask(data, rows)
        self.data = data.subset(usable)
        # Neighbours are looked up among all slices: an unlabelled neighbour is still an image.
        self._stack = (data.images, context_rows(data, context)[usable]) if context else None
        self.context_dropout = float(context_dropout) if context else 0.0
        if rows != "labelled":
            fg_fraction = 0.0
        self.prob = slice_probabilities(self.data, dataset_weights) if dataset_weights else None
        self.batch_size = batch_size
        h, w = self.data.images.shape[1:]
        self.patch = (h, w) if patch_size is None else (min(int(patch_size[0]), h), min(int(patch_size[1]), w))
        self.generator = generator
        self.margin = (int(margin[0]), int(margin[1]))
        self.n_fg = int(round(batch_size * fg_fraction)) if bool(self.data.foreground.any()) else 0
        self.fg_index = self.data.foreground.nonzero().flatten()
        self._centres = self._fg_centres() if self.patch != (h, w) else None

    def _fg_centres(self) -> torch.Tensor:
        lbl = self.data.labels > 0
        ys = torch.arange(lbl.shape[1], device=lbl.device, dtype=torch.float32)
        xs = torch.arange(lbl.shape[2], device=lbl.device, dtype=torch.float32)
        mass = lbl.sum((1, 2)).clamp(min=1).float()
        cy = (lbl.sum(2).float() * ys).sum(1) / mass
        cx = (lbl.sum(1).float() * xs).sum(1) / mass
        return torch.stack([cy, cx], 1)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        dev = self.data.images.device
        n = len(self.data)
        if self.prob is None:
            idx = torch.randint(0, n, (self.batch_size,), generator=self.generator, device=dev)
        else:
            idx = torch.multinomial(self.prob, self.batch_size, replacement=True, generator=self.generator)
        if self.n_fg:
            if self.prob is None:
                pick = torch.randint(0, len(self.fg_index), (self.n_fg,), generator=self.generator, device=dev)
            else:
                pick = torch.multinomial(self.prob[self.fg_index], self.n_fg, replacement=True, generator=self.generator)
            idx[: self.n_fg] = self.fg_index[pick]
        labels = self.data.labels[idx]
        if self._stack is None:
            images = self.data.images[idx][:, None]
        else:
            all_images, ctx = self._stack
            rows = ctx[idx]
            if self.context_dropout > 0:
                # A dropped sample's neighbours are its own slice: the network must also segment
                # from one slice, and cannot lean on context (measured at the issue-16 budget, one
                # seed: clean Dice 0.828 -> 0.832, severe motion 0.745 -> 0.759; rows CTX1-SH, CTX1-D5).
                drop = torch.rand(rows.shape[0], generator=self.generator, device=rows.device) < self.context_dropout
                centre = rows[:, rows.shape[1] // 2, None]  # the sampled slice's row (among all slices)
                rows = torch.where(drop[:, None], centre.expand_as(rows), rows)
            images = all_images[rows]  # (B, 1 + 2k, H, W)
        ph, pw = self.patch
        y0 = x0 = torch.zeros(self.batch_size, dtype=torch.long, device=dev)
        if (ph, pw) != tuple(images.shape[2:]):
            centres = None
            if self._centres is not None:
                centres = self._centres[idx]
                is_fg = torch.zeros(self.batch_size, dtype=torch.bool, device=dev)
                is_fg[: self.n_fg] = True
                centres = torch.where(is_fg[:, None], centres, torch.full_like(centres, -1.0))
            y0 = _crop_starts(images.shape[2], ph, self.batch_size, None if centres is None else centres[:, 0], self.generator, dev)
            x0 = _crop_starts(images.shape[3], pw, self.batch_size, None if centres is None else centres[:, 1], self.generator, dev)
            if centres is not None:  # background samples: uniform crops
                uy = _crop_starts(images.shape[2], ph, self.batch_size, None, self.generator, dev)
                ux = _crop_starts(images.shape[3], pw, self.batch_size, None, self.generator, dev)
                fg = centres[:, 0] >= 0
                y0, x0 = torch.where(fg, y0, uy), torch.where(fg, x0, ux)
        if (ph, pw) != tuple(images.shape[2:]) or any(self.margin):
            images, labels = self._crop(images, labels, y0, x0)
        return {"image": images.float(), "label": labels[:, None].long()}

    def _crop(self, images: torch.Tensor, labels: torch.Tensor, y0: torch.Tensor,
              x0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gather each patch (with its margin) by index; zeros where the margin leaves the slice.

        ``images`` is ``(B, channels, H, W)``, ``labels`` ``(B, H, W)``.
        """
        (ph, pw), (my, mx), dev = self.patch, self.margin, images.device
        h, w = images.shape[2:]
        rows = y0[:, None] - my + torch.arange(ph + 2 * my, device=dev)
        cols = x0[:, None] - mx + torch.arange(pw + 2 * mx, device=dev)
        b = torch.arange(self.batch_size, device=dev)[:, None, None]
        at = (b, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :])
        # Channels last for the gather (advanced indices first), then back: (B, C, ph, pw).
        images, labels = images.permute(0, 2, 3, 1)[at].permute(0, 3, 1, 2), labels[at]
        if my or mx:
            inside = (((rows >= 0) & (rows < h))[:, :, None]) & (((cols >= 0) & (cols < w))[:, None, :])
            images, labels = images * inside[:, None], labels * inside
        return images, labels

    def state(self) -> Dict[str, Any]:
        """Nothing beyond the generator (saved with the checkpoint's RNG state)."""
        return {}


class VolumeBatcher:
    """Infinite iterator of 3D slabs ``(B, 1, D, h, w)`` for 3D backbones.

    Cases are stacked into one padded tensor (pad value: each case's minimum, label 0), and
    slabs of ``D`` consecutive slices are gathered by index; a third come from slabs around
    foreground.
    """

    def __init__(self, data: SliceSet, batch_size: int, patch_size: Sequence[int], generator: torch.Generator,
                 fg_fraction: float = 0.33, rows: str = "labelled") -> None:
        keep = {cid for cid, m in zip(data.case_ids, row_mask(data, rows).tolist()) if m}
        vols = [v for v in data.volumes() if v["case_id"] in keep]
        if rows != "labelled":
            fg_fraction = 0.0
        self.depth = int(patch_size[0])
        zmax = max(self.depth, max(v["image"].shape[0] for v in vols))
        h, w = vols[0]["image"].shape[1:]
        dev = vols[0]["image"].device
        self.images = torch.stack([torch.cat([v["image"], v["image"].min().expand(zmax - v["image"].shape[0], h, w)])
                                   for v in vols])
        self.labels = torch.stack([torch.cat([v["label"], v["label"].new_zeros(zmax - v["label"].shape[0], h, w)])
                                   for v in vols])
        self.nz = torch.tensor([v["image"].shape[0] for v in vols], device=dev)
        fg_z = (self.labels > 0).flatten(2).any(2)  # (cases, zmax)
        self.fg_pairs = fg_z.nonzero()  # (k, 2): case, slice with foreground
        self.batch_size, self.generator = batch_size, generator
        self.n_fg = int(round(batch_size * fg_fraction)) if len(self.fg_pairs) else 0

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        dev, g, d = self.images.device, self.generator, self.depth
        case = torch.randint(0, self.images.shape[0], (self.batch_size,), generator=g, device=dev)
        hi = (self.nz[case] - d).clamp(min=0)
        start = (torch.rand(self.batch_size, generator=g, device=dev) * (hi + 1).float()).long().clamp(max=hi)
        if self.n_fg:
            pick = self.fg_pairs[torch.randint(0, len(self.fg_pairs), (self.n_fg,), generator=g, device=dev)]
            case[: self.n_fg] = pick[:, 0]
            hi_fg = (self.nz[pick[:, 0]] - d).clamp(min=0)
            start[: self.n_fg] = (pick[:, 1] - d // 2).clamp(min=0).minimum(hi_fg)
        zs = start[:, None] + torch.arange(d, device=dev)
        images = self.images[case[:, None], zs]
        labels = self.labels[case[:, None], zs]
        return {"image": images[:, None].float(), "label": labels[:, None].long()}
