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

Modules. This one keeps the import path of the whole method; the code lives in
`robustseg.engine.pseudo_labels_patches` (steps 1-2: boxes and patch positions),
`robustseg.engine.pseudo_labels_features` (steps 3-4: encodings and soft labels),
`robustseg.engine.pseudo_labels_pipeline` (options and the run on a store) and
`robustseg.engine.pseudo_labels_files` (the file format, reading, writing, the histogram).
"""
from __future__ import annotations

from robustseg.engine.pseudo_labels_features import (Assignment, assign_soft_labels, centre_codes,  # noqa: F401
                                                     default_feature_module, encode_patches)
from robustseg.engine.pseudo_labels_files import (REQUIRED_KEYS, check_pseudo_labels, load_pseudo_labels,  # noqa: F401
                                                  plot_similarity_histogram, save_pseudo_labels, write_outputs)
from robustseg.engine.pseudo_labels_patches import Box, bounding_box, crop, origin_range, sample_origins  # noqa: F401
from robustseg.engine.pseudo_labels_pipeline import (PseudoLabelParams, PseudoLabelResult,  # noqa: F401
                                                     generate_pseudo_labels, similarity_stats)

__all__ = ["REQUIRED_KEYS", "Assignment", "Box", "PseudoLabelParams", "PseudoLabelResult", "assign_soft_labels",
           "bounding_box", "centre_codes", "check_pseudo_labels", "crop", "default_feature_module", "encode_patches",
           "generate_pseudo_labels", "load_pseudo_labels", "origin_range", "plot_similarity_histogram",
           "sample_origins", "save_pseudo_labels", "similarity_stats", "write_outputs"]
