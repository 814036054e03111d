"""Ray Data streaming of slice shards to Ray Train workers.

The engine's default loader (`robustseg.engine.data.SliceBatcher`) decodes a whole fold onto
the device once. Under Ray Train the training folds are instead streamed: Ray Data reads the
manifest's Parquet shards (``file://`` or ``s3://``, through the store's own pyarrow
filesystem), keeps only labelled rows, splits them across the workers and prefetches; each
worker turns its stream into the ``{"image", "label"}`` batches the fit loop consumes.

Cost model: a batch arrives as a pyarrow table whose image column still holds the encoded
bytes (uint8 + delta2d filter + per-slice scale/offset, 1/4 of float32). Decoding is the
shard module's own `decode_images` / `decode_labels` (one ``np.frombuffer`` per column, two
cumulative sums, one multiply-add): microseconds per slice, done in the training process so
Ray's object store carries the compact bytes, not float tensors.

Only Ray code imports this module (it imports ``ray.data``); the engine stays Ray-free.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch

from robustseg.config import DataConfig
from robustseg.data.manifest import Manifest, read_manifest, verified_bytes
from robustseg.data.shards import SliceLayout, decode_images, decode_labels
from robustseg.data.storage import open_store

#: Columns a training step needs: the encoded image and its scale/offset, and the label.
TRAIN_COLUMNS = ("image", "image_scale", "image_offset", "label")

#: Default local shuffle buffer (slices). Shards are written case by case, so consecutive rows
#: are neighbouring slices of one heart; a few hundred rows mix several cases per batch at a
#: memory cost of ~64 KB per 256x256 uint8 slice.
DEFAULT_SHUFFLE_BUFFER = 256


def slice_dataset(cfg_data: DataConfig, manifest: Optional[Manifest] = None, *,
                  folds: Optional[Sequence[int]] = None, exclude_folds: Optional[Sequence[int]] = None,
                  labelled_only: bool = True, columns: Sequence[str] = TRAIN_COLUMNS,
                  shuffle_seed: Optional[int] = None) -> "ray.data.Dataset":  # noqa: F821
    """A Ray Dataset of the slice rows of some folds.

    Folds are selected by file (shards never mix folds), so excluded folds are never read.
    Rows whose label may not be used for training (no label, or outside the label budget) are
    dropped with an Arrow predicate after reading: ``read_parquet(filter=...)`` raises in
    Ray 2.60.

    Args:
        cfg_data: The data config (``shards_uri`` and ``storage`` locate the store).
        manifest: The store's manifest (read from the store when None).
        folds: Keep only these folds.
        exclude_folds: Drop these folds (e.g. the validation fold).
        labelled_only: Keep only rows with ``train_labelled`` (the label budget applied).
        columns: Columns to return (default: what a training step needs).
        shuffle_seed: Shuffle the file order with this seed, reseeded every epoch (None: keep
            the manifest order; rows are shuffled locally by `RayDataBatches` anyway).

    Returns:
        A lazy ``ray.data.Dataset``.

    Raises:
        ValueError: no shard matches the fold selection.
        StorageError: a shard's size, checksum or layout disagrees with the manifest.
    """
    import ray.data
    from ray.data import FileShuffleConfig

    store = open_store(cfg_data.shards_uri, cfg_data.storage)
    manifest = manifest or read_manifest(store)
    rels = manifest.shard_paths("slices", folds, exclude_folds)
    if not rels:
        raise ValueError(f"{store.uri}: no slice shards for folds={folds} exclude_folds={exclude_folds}")
    for rel in rels:
        # Ray Data reads the files itself, so check each against the manifest first. Shards are
        # immutable once named (robustseg.data.snapshot): what is verified here is what it reads.
        verified_bytes(store, manifest, rel)
    read_cols: List[str] = list(columns)
    if labelled_only and "train_labelled" not in read_cols:
        read_cols.append("train_labelled")
    ds = ray.data.read_parquet(
        [store.path(r) for r in rels], filesystem=store.fs, columns=read_cols,
        # Shard folders are "slices/fold-K", not hive "key=value": never infer partition columns.
        partitioning=None,
        shuffle=None if shuffle_seed is None else FileShuffleConfig(seed=int(shuffle_seed)),
    )
    if labelled_only:
        from ray.data.expressions import col

        ds = ds.filter(expr=col("train_labelled") == True)  # noqa: E712 (an expression, not a bool)
        if "train_labelled" not in columns:
            ds = ds.select_columns(list(columns))
    return ds


def labelled_rows(manifest: Manifest, folds: Optional[Sequence[int]] = None,
                  exclude_folds: Optional[Sequence[int]] = None) -> int:
    """Number of training-labelled slices in some folds, from the manifest (no data read)."""
    return sum(training_rows(manifest, exclude_folds or (), folds=folds).values())


def training_rows(manifest: Manifest, exclude_folds: Sequence[int], labelled_only: bool = True, *,
                  folds: Optional[Sequence[int]] = None) -> Dict[str, int]:
    """Slices per dataset outside some folds (or in ``folds``), training-labelled ones only by default."""
    inc = set(folds) if folds is not None else None
    exc = set(exclude_folds)
    counts: Dict[str, int] = {}
    for c in manifest.cases:
        in_folds = (inc is None or c["fold"] in inc) and c["fold"] not in exc
        if in_folds and (c.get("train_labelled") or not labelled_only):
            counts[c["dataset"]] = counts.get(c["dataset"], 0) + int(c["n_slices"])
    return counts


def acceptance_rates(counts: Mapping[str, int], weights: Mapping[str, float]) -> Dict[str, float]:
    """Per-dataset probability of keeping a streamed row so each dataset gets its weighted share.

    Keeping a row of dataset d with probability proportional to ``w_d / n_d`` (scaled so the
    largest is 1) gives d the share ``w_d / sum(w)`` of the kept rows, exactly as the
    in-memory batcher's sampling probabilities do; a down-weighted pool is thinned instead
    of a small target set being replicated, so no row is ever seen twice in one pass.
    """
    from robustseg.engine.data import dataset_slice_weights

    per = dataset_slice_weights(counts, weights)
    top = max(per.values())
    return {d: v / top for d, v in per.items()}


def decode_batch(table: Any, layout: SliceLayout) -> Dict[str, np.ndarray]:
    """Decode one pyarrow batch: float32 images ``(N, H, W)`` and uint8 labels ``(N, H, W)``.

    Args:
        table: A ``pyarrow.Table`` with the `TRAIN_COLUMNS`.
        layout: The shard layout (``manifest.layout``).
    """
    return {"image": decode_images(table, layout), "label": decode_labels(table, layout)}


class RayDataBatches:
    """Infinite iterator of training batches from a Ray Data shard, on the training device.

    Each pass over ``shard`` is one data epoch; when it is exhausted a new pass starts, so the
    fit loop can draw any number of iterations per epoch. ``drop_last`` keeps every batch the
    same size; with Ray Train's equal streaming split every rank sees the same number of
    batches per pass, so the ranks start new passes together (the split's epoch barrier).

    Sampling differs from the in-memory `SliceBatcher` in one way: rows come in local-shuffle
    order (no foreground oversampling); when the patch is smaller than the slice, each sample
    gets a uniform random crop drawn from ``generator``.

    Args:
        shard: ``ray.train.get_dataset_shard("train")`` or any ``ray.data.Dataset``.
        layout: The shard layout (``manifest.layout``).
        batch_size: Slices per batch.
        device: Training device.
        patch_size: ``(h, w)`` crop (None: whole slices).
        generator: Device generator for the crops (the fit loop's, so crops are resumable).
        local_shuffle_buffer_size: Rows in Ray Data's local shuffle buffer (0/None: off).
        seed: Base seed of the local shuffle (None: unseeded); pass ``seed + rank`` per worker.
        prefetch_batches: Batches Ray Data prepares ahead.
        accept: Per-dataset probability of keeping a row (`acceptance_rates`; the shard must
            carry the ``dataset`` column): pooled training with ``data.sampling_weights``.
            Draws come from a NumPy generator seeded by ``seed`` and the pass number.
    """

    def __init__(self, shard: Any, layout: SliceLayout, batch_size: int, device: torch.device, *,
                 patch_size: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None,
                 local_shuffle_buffer_size: Optional[int] = DEFAULT_SHUFFLE_BUFFER, seed: Optional[int] = None,
                 prefetch_batches: int = 2, accept: Optional[Mapping[str, float]] = None) -> None:
        self.shard = shard
        self.layout = layout
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        h, w = layout.height, layout.width
        self.patch = (h, w) if patch_size is None else (min(int(patch_size[-2]), h), min(int(patch_size[-1]), w))
        self.generator = generator
        self.shuffle = int(local_shuffle_buffer_size or 0)
        self.seed = seed
        self.prefetch = int(prefetch_batches)
        self.passes = 0  #: Completed passes over the shard (data epochs).
        self._it: Optional[Iterator[Any]] = None
        self.accept = dict(accept) if accept else None
        self._kept: List[Any] = []  # accepted rows waiting to fill a batch
        self._rng: Optional[np.random.Generator] = None

    def __iter__(self) -> "RayDataBatches":
        return self

    def _start_pass(self) -> Iterator[Any]:
        # A different shuffle seed per pass: a fixed seed would repeat the same order.
        seed = None if self.seed is None else int(self.seed) * 1000 + self.passes
        self._rng = np.random.default_rng(None if seed is None else seed + 1)
        return iter(self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="pyarrow", drop_last=True,
            prefetch_batches=self.prefetch,
            local_shuffle_buffer_size=self.shuffle if self.shuffle > 0 else None,
            local_shuffle_seed=seed if self.shuffle > 0 else None))

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self.accept is None:
            return self._to_device(decode_batch(self._next_table(), self.layout))
        import pyarrow as pa

        # Thin each streamed batch by dataset until a full batch is kept; rows left over start
        # the next batch, so nothing accepted is dropped.
        while sum(t.num_rows for t in self._kept) < self.batch_size:
            table = self._next_table()
            rates = np.array([self.accept.get(d, 0.0) for d in table.column("dataset").to_pylist()])
            assert self._rng is not None
            self._kept.append(table.filter(pa.array(self._rng.random(len(rates)) < rates)))
        kept = pa.concat_tables(self._kept)
        self._kept = [kept.slice(self.batch_size)]
        return self._to_device(decode_batch(kept.slice(0, self.batch_size), self.layout))

    def _next_table(self) -> Any:
        fresh = self._it is None
        if self._it is None:
            self._it = self._start_pass()
        try:
            table = next(self._it)
        except StopIteration:
            if fresh:
                raise ValueError(f"the training shard holds fewer than batch_size={self.batch_size} labelled "
                                 "slices (check folds, the label budget and the number of workers)") from None
            self._it, self.passes = None, self.passes + 1
            return self._next_table()
        return table

    def close(self) -> None:
        """Stop the current pass (releases Ray Data's iterator before a shutdown)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def _to_device(self, arrays: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
        pin = self.device.type == "cuda"
        image = torch.from_numpy(arrays["image"])
        label = torch.from_numpy(arrays["label"])
        if pin:  # pinned host memory lets the copy overlap the previous step
            image, label = image.pin_memory(), label.pin_memory()
        image = image.to(self.device, non_blocking=pin)
        label = label.to(self.device, non_blocking=pin)
        image, label = self._crop(image, label)
        return {"image": image[:, None].float(), "label": label[:, None].long()}

    def _crop(self, image: torch.Tensor, label: torch.Tensor) -> tuple:
        ph, pw = self.patch
        n, h, w = image.shape
        if (ph, pw) == (h, w):
            return image, label
        dev = image.device
        y0 = torch.randint(0, h - ph + 1, (n,), generator=self.generator, device=dev)
        x0 = torch.randint(0, w - pw + 1, (n,), generator=self.generator, device=dev)
        rows = (y0[:, None] + torch.arange(ph, device=dev))[:, :, None]
        cols = (x0[:, None] + torch.arange(pw, device=dev))[:, None, :]
        b = torch.arange(n, device=dev)[:, None, None]
        return image[b, rows, cols], label[b, rows, cols]
