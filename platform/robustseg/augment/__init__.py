"""Batched augmentation on the training device (torch; the same code runs on CPU in tests).

The engine builds one `Augmenter` per worker with `build_augmenter(cfg.augment, spatial_dims)`
and calls ``augmenter(image, label, generator)`` on every batch, already on the GPU, so a
GPU is fed by one or two CPU processes instead of a dozen augmentation workers. All
randomness comes from the ``torch.Generator`` passed in, so a seed reproduces a batch.

Modules: ``spatial`` (rotation, scaling, elastic through one grid; mirroring), ``intensity``
(nnU-Net v2's noise, blur, brightness, contrast, low resolution, gamma), ``presets``
(nnunet / light / none, overrides, the `Augmenter`), ``mixup`` (`mixup_batch`), ``motion``
(k-space respiratory motion, `motion_augment`; ``augment.params.motion`` in training).
"""
from robustseg.augment.mixup import mixup_batch, sample_beta
from robustseg.augment.motion import motion_augment
from robustseg.augment.presets import PRESETS, Augmenter, build_augmenter, resolve_params

__all__ = ["Augmenter", "PRESETS", "build_augmenter", "mixup_batch", "motion_augment", "resolve_params", "sample_beta"]
