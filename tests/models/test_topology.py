"""nnU-Net-like topology derivation: stage count, anisotropic pooling, size floor."""
from __future__ import annotations

import random

import pytest

from robustseg.errors import ConfigError
from robustseg.models.topology import check_patch, derive_topology


def test_isotropic_2d_256():
    topo = derive_topology((256, 256), (1.25, 1.25))
    assert topo.n_stages == 7  # 6 downsamplings: 256 -> 4
    assert topo.strides[0] == (1, 1) and all(s == (2, 2) for s in topo.strides[1:])
    assert all(k == (3, 3) for k in topo.kernels)
    assert topo.sizes[-1] == (4, 4)
    assert topo.divisible_by == 64 and topo.divisible_by_axes == (64, 64)
    iso, fine = derive_topology((256, 256)), derive_topology((256, 256), (0.7, 0.7))
    assert (iso.strides, iso.kernels) == (fine.strides, fine.kernels)


def test_max_stages_caps_depth():
    assert derive_topology((512, 512)).n_stages == 8
    assert derive_topology((512, 512), max_stages=5).n_stages == 5
    assert derive_topology((224, 224)).sizes[-1] == (7, 7)  # 7 < 8: no further pooling


def test_anisotropic_3d_does_not_pool_slices_early():
    # spacing (z, y, x) = (10, 1.5, 1.5) mm, patch (D, H, W) = (16, 160, 160)
    topo = derive_topology((16, 160, 160), (10.0, 1.5, 1.5))
    assert topo.strides[1] == (1, 2, 2) and topo.strides[2] == (1, 2, 2)
    assert topo.kernels[0] == (1, 3, 3) and topo.kernels[1] == (1, 3, 3)
    z_pooled = [i for i, s in enumerate(topo.strides) if s[0] == 2]
    assert z_pooled and z_pooled[0] >= 3  # only once in-plane spacing is within 2x of 10 mm
    assert topo.kernels[-1] == (3, 3, 3)
    assert topo.divisible_by_axes[0] < topo.divisible_by_axes[1]
    assert topo.padded((10, 160, 150)) == (topo.divisible_by_axes[0] * 3, 160, 160)


def test_sizes_never_drop_below_minimum():
    rng = random.Random(0)
    for _ in range(200):
        dims = rng.choice([2, 3])
        patch = [rng.randint(4, 300) for _ in range(dims)]
        spacing = [rng.uniform(0.5, 12.0) for _ in range(dims)]
        min_size = rng.choice([4, 6, 8])
        topo = derive_topology(patch, spacing, min_size=min_size)
        for prev, cur, stride in zip(topo.sizes, topo.sizes[1:], topo.strides[1:]):
            for a in range(dims):
                if stride[a] == 2:
                    assert prev[a] >= 2 * min_size and cur[a] >= min_size
                else:
                    assert cur[a] == prev[a]
        assert topo.n_stages <= 8
        # Once an axis is 3-wide it stays so.
        for a in range(dims):
            ks = [k[a] for k in topo.kernels]
            assert ks == sorted(ks)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="does not match"):
        derive_topology((64, 64), (1.0, 1.0, 1.0))
    with pytest.raises(ConfigError):
        derive_topology((64,))
    with pytest.raises(ConfigError):
        derive_topology((64, 64), (0.0, 1.0))


def test_check_patch_suggests_valid_size():
    check_patch("x", (64, 64), (32, 32))
    with pytest.raises(ConfigError, match=r"use e\.g\. \(64, 64\)"):
        check_patch("x", (60, 64), (32, 32))
