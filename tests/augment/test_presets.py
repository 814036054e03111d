"""Presets, overrides, validation and the Augmenter contract (determinism, devices, shapes)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from robustseg.augment import build_augmenter, resolve_params
from robustseg.config import AugmentConfig, ExperimentConfig
from robustseg.errors import ConfigError


def _batch(dims: int = 2, b: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 1, 64, 64) if dims == 2 else (b, 1, 8, 32, 32)
    image = torch.randn(shape, generator=g)
    label = torch.randint(0, 4, shape, generator=g)
    return image, label


def test_nnunet_preset_has_nnunet_defaults():
    p = resolve_params("nnunet")
    assert p["rotation"]["p"] == 0.2 and p["rotation"]["degrees"] == [-180.0, 180.0]
    assert p["scaling"] == {"p": 0.2, "range": [0.7, 1.4]}
    assert p["noise"] == {"p": 0.1, "std": [0.0, 0.1]}
    assert p["blur"] == {"p": 0.2, "sigma": [0.5, 1.0], "p_per_channel": 0.5}
    assert p["brightness"]["p"] == p["contrast"]["p"] == 0.15
    assert p["lowres"]["p"] == 0.25 and p["lowres"]["zoom"] == [0.5, 1.0]
    assert p["gamma"]["p"] == 0.3 and p["inverted_gamma"]["p"] == 0.1
    assert p["gamma"]["gamma"] == [0.7, 1.5] and p["gamma"]["retain_stats"]
    assert p["mirror"]["p"] == 0.5 and p["elastic"]["p"] == 0.0
    assert build_augmenter(AugmentConfig(), 3).params["mirror"]["axes"] == [0, 1, 2]


def test_light_preset_is_the_thesis_scheme():
    p = resolve_params("light")
    assert p["rotation"]["degrees"] == [-3.0, 3.0] and p["rotation"]["p"] > 0
    assert p["elastic"]["p"] > 0 and p["elastic"]["max_displacement"][1] <= 4
    assert p["gamma"]["p"] > 0 and p["noise"]["p"] > 0
    assert p["mirror"]["p"] == 0  # flips are too violent for CT
    for off in ("scaling", "blur", "brightness", "contrast", "lowres", "inverted_gamma"):
        assert p[off]["p"] == 0, off


def test_none_preset_is_identity():
    image, label = _batch()
    out, lab = build_augmenter(AugmentConfig(preset="none"), 2)(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(out, image) and torch.equal(lab, label)


def test_overrides_merge_and_normalise():
    aug = build_augmenter(AugmentConfig(params={"rotation": {"p": 0.5, "degrees": 30}, "mirror": {"p": 0},
                                                "scaling": {"range": 1.1}}), 2)
    assert aug.params["rotation"] == {"p": 0.5, "degrees": [-30.0, 30.0], "out_of_plane_degrees": [0.0, 0.0]}
    assert aug.params["mirror"]["p"] == 0.0
    assert aug.params["scaling"] == {"p": 0.2, "range": [1.1, 1.1]}
    assert resolve_params("nnunet")["rotation"]["p"] == 0.2  # presets are not mutated


def test_auto_preset_is_cardiac_for_cardiac_mr_and_nnunet_otherwise():
    from robustseg.augment.presets import CARDIAC, NNUNET

    assert AugmentConfig().preset == "auto"
    cardiac = build_augmenter(AugmentConfig(), 2, "cmr")
    assert cardiac.preset == "cardiac" and cardiac.params["motion"] == {"p": 0.5, "levels": [2, 3],
                                                                        "phase_axis": "random"}
    assert {k: v for k, v in CARDIAC.items() if k != "motion"} == {k: v for k, v in NNUNET.items() if k != "motion"}
    for plan in ("ct", "slices2d", None):
        aug = build_augmenter(AugmentConfig(), 2, plan)
        assert aug.preset == "nnunet" and aug.params["motion"]["p"] == 0.0
    # An explicit preset is kept whatever the plan; overrides apply on top of auto's choice.
    assert build_augmenter(AugmentConfig(preset="nnunet"), 2, "cmr").params["motion"]["p"] == 0.0
    assert build_augmenter(AugmentConfig(params={"motion": {"p": 0.5}}), 2, "cmr").params["motion"]["p"] == 0.5


def test_unknown_transform_or_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown transform 'rotate'.*'rotation'.*'mirror'"):
        resolve_params("nnunet", {"rotate": {"p": 1}})
    with pytest.raises(ConfigError, match=r"rotation: unknown key\(s\) \['angle'\]; valid keys: \['p', 'degrees'"):
        resolve_params("nnunet", {"rotation": {"angle": 3}})
    with pytest.raises(ConfigError, match=r"unknown preset 'heavy'; valid: auto, cardiac, light, nnunet, none"):
        build_augmenter(AugmentConfig(preset="heavy"), 2)


@pytest.mark.parametrize("params, match", [
    ({"rotation": {"p": 1.5}}, r"rotation\.p must be a probability"),
    ({"scaling": {"range": [1.4, 0.7]}}, r"scaling\.range must satisfy low <= high"),
    ({"lowres": {"zoom": [0.5, 2.0]}}, r"lowres\.zoom"),
    ({"gamma": {"retain_stats": "yes"}}, r"gamma\.retain_stats must be true or false"),
    ({"mirror": {"axes": [2]}}, r"mirror\.axes: \[2\] out of range for 2 spatial dims"),
    ({"spatial": {"image_pad": "edge"}}, r"image_pad must be zeros, border, reflection, min"),
    ({"noise": 0.3}, r"augment\.params\.noise must be a mapping"),
])
def test_bad_values_raise_config_error(params, match):
    with pytest.raises(ConfigError, match=match):
        build_augmenter(AugmentConfig(params=params), 2)


def test_built_from_experiment_config_and_describe_is_plain():
    cfg = ExperimentConfig.from_dict({"augment": {"preset": "light", "params": {"noise": {"p": 0.5}}, "mixup": 0.3,
                                                  "mixup_alpha": 0.2}})
    aug = build_augmenter(cfg.augment, 2)
    d = aug.describe()
    assert d["preset"] == "light" and d["transforms"]["noise"]["p"] == 0.5
    assert d["mixup_p"] == 0.3 and d["mixup_alpha"] == 0.2
    json.dumps(d)  # loggable as is
    with pytest.raises(ConfigError, match="augment.mixup"):
        build_augmenter(AugmentConfig(mixup=2.0), 2)
    with pytest.raises(ConfigError, match="augment.mixup_alpha"):
        build_augmenter(AugmentConfig(mixup=0.5, mixup_alpha=0.0), 2)
    with pytest.raises(ConfigError, match="spatial_dims"):
        build_augmenter(AugmentConfig(), 4)


def test_construction_is_cheap():
    t0 = time.perf_counter()
    for _ in range(100):
        build_augmenter(AugmentConfig(params={"rotation": {"p": 0.5}}), 2)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("dims", [2, 3])
def test_same_seed_is_bit_identical_other_seed_differs(dims):
    image, label = _batch(dims)
    aug = build_augmenter(AugmentConfig(preset="nnunet"), dims)
    a = aug(image, label, torch.Generator().manual_seed(42))
    b = aug(image, label, torch.Generator().manual_seed(42))
    c = aug(image, label, torch.Generator().manual_seed(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    g = torch.Generator().manual_seed(42)
    first, second = aug(image, label, g), aug(image, label, g)
    assert not torch.equal(first[0], second[0])  # the generator advances


@pytest.mark.parametrize("dims, label_dtype", [(2, torch.int64), (2, torch.uint8), (3, torch.int64), (3, torch.uint8)])
def test_nnunet_preset_shapes_dtypes_and_sane_stats(dims, label_dtype):
    image, label = _batch(dims, b=8)
    label = label.to(label_dtype)
    aug = build_augmenter(AugmentConfig(preset="nnunet", params={
        "rotation": {"p": 0.8}, "scaling": {"p": 0.8}, "elastic": {"p": 0.5}}), dims)
    out, lab = aug(image, label, torch.Generator().manual_seed(7))
    assert out.shape == image.shape and lab.shape == label.shape
    assert out.dtype == image.dtype and lab.dtype == label_dtype and out.device == image.device
    assert torch.isfinite(out).all()
    assert set(lab.unique().tolist()) <= set(label.unique().tolist())
    assert abs(float(out.mean())) < 0.5 and 0.4 < float(out.std()) < 1.5


def test_bad_inputs_raise_value_error():
    image, label = _batch()
    aug = build_augmenter(AugmentConfig(), 2)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="label must be an integer"):
        aug(image, label.float(), g)
    with pytest.raises(ValueError, match="does not match image"):
        aug(image, label[:, :, :32], g)
    with pytest.raises(ValueError, match="2 spatial dims"):
        aug(image[:, :, None], label, g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_runs_on_cuda_with_a_cuda_generator():
    image, label = _batch()
    image, label = image.cuda(), label.cuda()
    aug = build_augmenter(AugmentConfig(preset="nnunet", params={"elastic": {"p": 0.5}}), 2)
    a = aug(image, label, torch.Generator(device="cuda").manual_seed(1))
    b = aug(image, label, torch.Generator(device="cuda").manual_seed(1))
    assert a[0].is_cuda and a[1].dtype == label.dtype and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="generator on cpu"):
        aug(image, label, torch.Generator().manual_seed(1))
