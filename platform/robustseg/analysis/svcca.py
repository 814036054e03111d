"""SVCCA: how similar two layers' representations are, over training and across models.

Singular Vector Canonical Correlation Analysis (Raghu et al. 2017, arXiv:1706.05806), as the
lung CT thesis uses it (Ch. 2.4.2 and 5.2.4, Figs 5.2-5.5):

1. **Datapoints.** A layer's output over a fixed probe set is a ``(datapoints, neurons)``
   matrix. A convolutional map ``(N, C, *S)`` gives one datapoint per image *and* spatial
   position, ``(N * prod(S), C)``: a channel is a neuron, as in the paper's treatment of
   conv layers (`as_datapoints`).
2. **SV step.** Each side is centred and reduced, separately, to its top singular directions
   explaining ``keep`` (99 %) of the variance: the low-variance directions are mostly noise,
   which CCA would otherwise happily correlate (`svd_reduce`).
3. **CCA step.** The canonical correlations of two subspaces are the singular values of
   ``Qa^T Qb`` for orthonormal bases ``Qa``, ``Qb`` of the centred data (`cca`): no covariance
   is inverted, so it stays stable when neurons outnumber datapoints or a side is
   rank-deficient (the rank is read off the singular values, not assumed).
4. **Similarity** = the mean canonical correlation (`svcca`).

Memory and cost. A 512 x 512 first stage has 262k positions per slice, far more datapoints
than SVD needs. Three bounds, all deterministic so that every model sees the same rows:

* capture average-pools every map to at most ``max_grid`` positions per axis
  (`capture_activations`): each image region still contributes, but the stored activations
  are ``N x C x max_grid^2`` floats at most;
* two layers of different resolution are compared on the coarser grid (the finer one is
  average-pooled to it), so both halves of a datapoint describe the same image region (this
  is what makes the layer i of A vs layer j of B heatmap possible);
* at most ``max_points`` datapoints enter the SVD: a fixed random subset of the rows, the
  same for both sides (the paper subsamples conv positions the same way).

CCA needs many more datapoints than kept directions: with ``dims_a + dims_b >= n_points``
the correlations are forced towards 1 (`SVCCAResult.underdetermined`); probe more slices.

Layers. `default_layers` finds a backbone's top-level blocks in forward order (encoder
stages, bottleneck, decoder stages, output) without knowing the backbone: see its notes.

Modules. This one keeps the import path of the whole analysis; the code lives in
`robustseg.analysis.svcca_math` (steps 1-4: options, results, the numbers),
`robustseg.analysis.svcca_layers` (which layers), `robustseg.analysis.svcca_activations`
(capture and comparisons on a common grid) and `robustseg.analysis.svcca_outputs` (training
curves, heatmap, JSON and plots). `robustseg.analysis.svcca_runs` applies it to run folders.
"""
from __future__ import annotations

from robustseg.analysis.svcca_activations import (LayerSpace, capture_activations, common_grid,  # noqa: F401
                                                  compare_layers, layer_similarity, similarity_matrix)
from robustseg.analysis.svcca_layers import LayerInfo, check_layers, default_layers, feature_layout  # noqa: F401
from robustseg.analysis.svcca_math import (SVCCAOptions, SVCCAResult, as_datapoints, cca, subsample_rows,  # noqa: F401
                                           svcca, svd_reduce)
from robustseg.analysis.svcca_outputs import (PairSimilarity, TrainingCurve, plot_heatmap, plot_training,  # noqa: F401
                                              results_doc, write_outputs)

__all__ = ["LayerInfo", "LayerSpace", "PairSimilarity", "SVCCAOptions", "SVCCAResult", "TrainingCurve", "as_datapoints",
           "capture_activations", "cca", "check_layers", "common_grid", "compare_layers", "default_layers",
           "feature_layout", "layer_similarity", "plot_heatmap", "plot_training", "results_doc", "similarity_matrix",
           "subsample_rows", "svcca", "svd_reduce", "write_outputs"]
