"""Cosine-similarity pseudo labels: boxes, patches, window + top-2 mix, file format, CLI end to end."""
from __future__ import annotations

import argparse
import json
import math
from typing import List

import pytest
import torch
import torch.nn.functional as F

from robustseg.config import ModelConfig
from robustseg.engine import pseudo_labels as pl
from robustseg.errors import ConfigError, DataError
from robustseg.models import build_model
from robustseg.cli.pseudo import register, parse_window, run_metrics

CPU = torch.device("cpu")


def _unit(angle: float, tilt: float = 0.0) -> List[float]:
    """A unit vector at ``angle`` in the x-y plane, tilted ``tilt`` out of it: its cosine to an
    in-plane unit vector at ``b`` is ``cos(tilt) * cos(angle - b)``."""
    return [math.cos(angle) * math.cos(tilt), math.sin(angle) * math.cos(tilt), math.sin(tilt)]


def _one_hot(label: torch.Tensor, c: int) -> torch.Tensor:
    return F.one_hot(label.long(), c).permute(2, 0, 1).float()


@pytest.fixture(scope="module")
def known():
    """Dictionary at angles 0, 0.5, pi/2 and four unlabelled vectors with known cosines."""
    angles = [0.0, 0.5, math.pi / 2]
    dictionary = torch.tensor([_unit(a) for a in angles])
    labels = torch.zeros(3, 4, 4, dtype=torch.long)
    labels[0, :2] = 1  # top half class 1
    labels[1] = 2  # all class 2
    labels[2, :, 2:] = 3
    spec = [(0.02, 0.0), (0.2, 0.3), (-0.3, 0.2), (1.0, 0.5)]  # (angle, tilt)
    unlabelled = torch.tensor([_unit(a, t) for a, t in spec])
    sims = [[math.cos(t) * math.cos(a - b) for b in angles] for a, t in spec]
    return dictionary, labels, unlabelled, sims


def test_window_keeps_exactly_the_expected_patches_and_mixes_the_top2(known):
    dictionary, labels, unlabelled, sims = known
    # Best similarities: 0.9998 (redundant), 0.936 with a second of 0.913, 0.936 with a second of 0.683,
    # 0.770 (unreliable).
    out = pl.assign_soft_labels(unlabelled, dictionary, labels, num_classes=4, window=(0.87, 0.96), top_k=2)
    assert out.best.tolist() == pytest.approx([max(s) for s in sims], abs=1e-6)
    assert out.keep.tolist() == [False, True, True, False]
    assert out.too_similar.tolist() == [True, False, False, False]
    assert out.too_dissimilar.tolist() == [False, False, False, True]
    assert out.soft.shape == (2, 4, 4, 4)
    s0, s1 = sims[1][0], sims[1][1]
    expected = (s0 * _one_hot(labels[0], 4) + s1 * _one_hot(labels[1], 4)) / (s0 + s1)
    assert torch.allclose(out.soft[0], expected, atol=1e-6)
    # The third patch's runner-up (0.683) is below the window: it takes the best entry's label alone.
    assert torch.allclose(out.soft[1], _one_hot(labels[0], 4))
    assert torch.allclose(out.soft.sum(1), torch.ones(2, 4, 4))
    top1 = pl.assign_soft_labels(unlabelled, dictionary, labels, num_classes=4, window=(0.87, 0.96), top_k=1)
    assert torch.allclose(top1.soft[0], _one_hot(labels[0], 4))
    wide = pl.assign_soft_labels(unlabelled, dictionary, labels, num_classes=4, window=(0.5, 1.0))
    assert wide.keep.all() and not wide.too_similar.any() and not wide.too_dissimilar.any()


def test_soft_masks_sum_to_one_for_random_features():
    g = torch.Generator().manual_seed(0)
    dictionary = F.normalize(torch.randn(20, 16, generator=g), dim=1)
    unlabelled = F.normalize(torch.randn(30, 16, generator=g), dim=1)
    labels = torch.randint(0, 3, (20, 8, 8), generator=g)
    out = pl.assign_soft_labels(unlabelled, dictionary, labels, num_classes=3, window=(-1.0, 1.0), top_k=3)
    assert out.keep.all() and out.soft.shape == (30, 3, 8, 8)
    assert out.soft.min() >= 0 and torch.allclose(out.soft.sum(1), torch.ones(30, 8, 8), atol=1e-6)
    assert torch.allclose(out.weight.sum(1), torch.ones(30))
    none = pl.assign_soft_labels(unlabelled[:0], dictionary, labels, num_classes=3)
    assert none.soft.shape == (0, 3, 8, 8) and none.best.shape == (0,)
    with pytest.raises(ValueError, match="lie in"):
        pl.assign_soft_labels(unlabelled, dictionary, labels + 3, num_classes=3)
    with pytest.raises(ValueError, match="empty"):
        pl.assign_soft_labels(unlabelled, dictionary[:0], labels[:0], num_classes=3)


def test_bounding_box_is_enlarged_and_clipped_to_the_image():
    mask = torch.zeros(20, 30, dtype=torch.uint8)
    mask[2:5, 10:13] = 1
    mask[3, 14] = 2  # any foreground class counts
    assert pl.bounding_box(mask, 5) == pl.Box(0, 5, 10, 20)  # top clipped at 0
    assert pl.bounding_box(mask, 0) == pl.Box(2, 10, 5, 15)
    corner = torch.zeros(20, 30)
    corner[-1, -1] = 1
    assert pl.bounding_box(corner, 15) == pl.Box(4, 14, 20, 30)
    assert pl.bounding_box(torch.zeros(20, 30), 10) is None


def test_patches_stay_in_the_image_and_inside_or_around_the_box():
    shape, p = (64, 80), 16
    boxes = [(0, pl.Box(5, 10, 50, 70)),  # larger than the patch: patch inside the box
             (1, pl.Box(0, 70, 6, 80)),  # smaller, in a corner: patch covers the box, clipped to the image
             (2, pl.Box(30, 0, 40, 64))]  # mixed: short in y, long in x
    origins = pl.sample_origins(boxes, 300, p, shape, torch.Generator().manual_seed(1))
    assert len(origins) == len(set(origins)) and 0 < len(origins) <= 300
    assert {row for row, _, _ in origins} == {0, 1, 2}
    for row, y0, x0 in origins:
        b = dict(boxes)[row]
        assert 0 <= y0 <= shape[0] - p and 0 <= x0 <= shape[1] - p
        for start, lo, hi in ((y0, b.y0, b.y1), (x0, b.x0, b.x1)):
            if hi - lo >= p:
                assert lo <= start and start + p <= hi
            else:
                assert start <= lo and start + p >= hi
    again = pl.sample_origins(boxes, 300, p, shape, torch.Generator().manual_seed(1))
    assert again == origins
    stack = torch.arange(3 * 64 * 80, dtype=torch.float32).reshape(3, 64, 80)
    patches = pl.crop(stack, origins[:5], p)
    for k, (row, y0, x0) in enumerate(origins[:5]):
        assert torch.equal(patches[k], stack[row, y0:y0 + p, x0:x0 + p])
    with pytest.raises(ValueError, match="larger than the image"):
        pl.origin_range(0, 10, 90, 80)


@pytest.mark.parametrize("backbone,params", [("unet2d", {"filters_base": 4, "filters_max": 16, "max_stages": 3}),
                                             ("unet", {"base": 4, "depth": 3})])
def test_encoder_features_stop_before_the_decoder(backbone, params):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=backbone, params=params, num_classes=2), (32, 32)).eval()
    module = pl.default_feature_module(backbone)
    patches = torch.randn(5, 1, 36, 36)  # 36 is not a multiple of 8: a full forward pass would fail
    patches[4] = patches[0]
    feats = pl.encode_patches(model, patches, module, batch_size=2)
    assert feats.shape[0] == 5 and torch.allclose(feats.norm(dim=1), torch.ones(5), atol=1e-5)
    assert float(feats[0] @ feats[4]) == pytest.approx(1.0, abs=1e-5)
    assert not model._forward_hooks and not dict(model.named_modules())[module]._forward_hooks
    with pytest.raises(ConfigError, match="not in the model"):
        pl.encode_patches(model, patches, "nowhere")


def test_default_feature_modules_and_param_validation():
    assert pl.default_feature_module("unet2d") == "net.bottleneck"
    assert pl.default_feature_module("swin_unetr") == "encoder10"
    with pytest.raises(ConfigError, match="feature_module"):
        pl.default_feature_module("attention_unet")
    p = pl.PseudoLabelParams()
    assert (p.patch_size, p.window, p.top_k, p.dictionary_size, p.per_case) == (68, [0.87, 0.96], 2, 120, 32)
    assert (p.labelled_margin, p.unlabelled_margin) == (10, 15)
    with pytest.raises(ConfigError, match="window"):
        pl.PseudoLabelParams(window=[0.96, 0.87])
    with pytest.raises(ConfigError, match="top_k"):
        pl.PseudoLabelParams(top_k=0)
    assert parse_window("0.8, 0.9") == [0.8, 0.9]
    with pytest.raises(ConfigError, match="--window"):
        parse_window("0.8")


def _valid(n: int = 3, p: int = 8, c: int = 2) -> dict:
    soft = torch.rand(n, c, p, p)
    return {"images": torch.randn(n, 1, p, p), "soft": soft / soft.sum(1, keepdim=True),
            "similarity": torch.full((n,), 0.9), "source": [("case", 1, 2)] * n,
            "slice_index": torch.arange(n), "meta": {"params": {}}}


def test_file_round_trip_and_validation_errors(tmp_path):
    data = _valid()
    path = pl.save_pseudo_labels(data, tmp_path / "sub" / "pl.pt")
    back = pl.load_pseudo_labels(path)
    assert torch.equal(back["soft"], data["soft"]) and back["source"] == [("case", 1, 2)] * 3
    assert not list(tmp_path.glob("sub/*.tmp"))
    bad = {k: v for k, v in _valid().items() if k != "soft"}
    torch.save(bad, tmp_path / "missing.pt")
    with pytest.raises(DataError, match=r"missing\.pt: .*missing keys \['soft'\]"):
        pl.load_pseudo_labels(tmp_path / "missing.pt")
    shapes = _valid()
    shapes["soft"] = shapes["soft"][:, :, :4]
    torch.save(shapes, tmp_path / "shape.pt")
    with pytest.raises(DataError, match=r"shape\.pt: soft must be"):
        pl.load_pseudo_labels(tmp_path / "shape.pt")
    unnormalised = _valid()
    unnormalised["soft"] *= 2
    with pytest.raises(DataError, match="sum to 1"):
        pl.save_pseudo_labels(unnormalised, tmp_path / "x.pt")
    short = _valid()
    short["source"] = short["source"][:1]
    with pytest.raises(DataError, match="source must list 3"):
        pl.check_pseudo_labels(short, "f.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match=r"junk\.pt: unreadable"):
        pl.load_pseudo_labels(tmp_path / "junk.pt")
    with pytest.raises(DataError, match="not found"):
        pl.load_pseudo_labels(tmp_path / "none.pt")
    empty = pl.save_pseudo_labels(_valid(n=0), tmp_path / "empty.pt")  # written for inspection ...
    with pytest.raises(DataError, match="no pseudo labels"):  # ... but never fed to training
        pl.load_pseudo_labels(empty)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny store with a label budget of one subject, and a coarse model validated on fold 1.

    Fold 0 holds syn0000 (training-labelled) and syn0001 (labels outside the budget: unlabelled
    for training); fold 1 (syn0002, syn0003) is the validation fold. The model is the tiny
    U-Net at a fixed random initialisation (its predictions are arbitrary but deterministic,
    and training would only cost time): a checkpoint as the fit loop writes it.
    """
    from robustseg.data.manifest import read_manifest
    from robustseg.data.prepare import prepare
    from robustseg.engine.checkpoint import save_checkpoint
    from tiny import tiny_cfg

    root = tmp_path_factory.mktemp("pseudo")
    cfg = tiny_cfg(root, **{"data.label_budget": 1, "data.val_fold": 1})
    prepare(cfg.data)
    manifest = read_manifest(cfg.data.shards_uri)
    roles = {c["case_id"]: (c["fold"], c["train_labelled"]) for c in manifest.cases}
    assert roles["syn0000_ED"] == (0, True) and roles["syn0001_ED"] == (0, False), roles
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "run" / "best.pt", {
        "backbone": cfg.model.name, "model": build_model(cfg.model, (64, 64)).state_dict(), "config": cfg.to_dict(),
        "patch_size": [64, 64], "spacing": [1.5, 1.5], "task": manifest.task, "plan": manifest.plan,
        "class_names": {int(k): v for k, v in manifest.class_names.items()}})
    return root, ckpt


def _run_cli(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="robustseg")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pseudo-label", *argv])
    return args.fn(args)


def test_cli_end_to_end_file_histogram_and_mlflow(tiny, tmp_path, capsys):
    from mlflow import MlflowClient

    from robustseg.data.manifest import read_manifest
    from robustseg.data.storage import open_store
    from robustseg.engine.data import load_slice_set

    root, ckpt = tiny
    out, uri = tmp_path / "pl" / "fold1.pt", f"sqlite:///{tmp_path}/mlflow.db"
    # The tiny model's features are all alike, so the window is widened to keep patches.
    assert _run_cli(["--model", str(ckpt), "--data", str(root / "shards" / "manifest.json"), "--fold", "1",
                     "--patch", "32", "--window", "0,1", "--per-case", "8", "--dictionary-size", "16",
                     "--out", str(out), "--tracking-uri", uri, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "2 unlabelled case(s)" in text and "MLflow run" in text

    data = pl.load_pseudo_labels(out)
    n = len(data["source"])
    assert 0 < n <= 16 and data["images"].shape == (n, 1, 32, 32) and data["soft"].shape == (n, 4, 32, 32)
    assert data["images"].dtype == torch.float32 and data["soft"].dtype == torch.float32
    assert torch.allclose(data["soft"].sum(1), torch.ones(n, 32, 32), atol=1e-5)
    # Only training-fold slices without a usable label: never the budgeted subject, never fold 1.
    assert {cid.split("_")[0] for cid, _, _ in data["source"]} == {"syn0001"}
    counts = data["meta"]["counts"]
    assert counts["patches"] == counts["kept"] == n and counts["unlabelled_cases"] == 2
    assert counts["dictionary"] <= 16 and counts["labelled_slices"] == counts["labelled_boxes"] + counts[
        "skipped_labelled_slices"]
    assert data["meta"]["fold"] == 1 and data["meta"]["feature_module"] == "net.bottleneck"
    # Images are the store's normalised slices, cropped where the source says.
    store = open_store(str(root / "shards"))
    slices = load_slice_set(store, read_manifest(store), folds=[0], device=CPU)
    (cid, y0, x0), z = data["source"][0], int(data["slice_index"][0])
    row = next(i for i, c in enumerate(slices.case_ids) if c == cid and int(slices.slice_index[i]) == z)
    assert torch.equal(data["images"][0, 0], slices.images[row, y0:y0 + 32, x0:x0 + 32].float())

    summary = json.loads((tmp_path / "pl" / "fold1_summary.json").read_text())
    assert summary["counts"] == counts and summary["params"]["window"] == [0.0, 1.0]
    assert (tmp_path / "pl" / "fold1_similarity.png").stat().st_size > 1000
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pseudo_labels").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["kept"] == n
    assert run.data.metrics == pytest.approx(run_metrics(summary))
    assert run.data.params["pl.patch_size"] == "32" and run.data.params["output"] == str(out)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "pseudo_labels")} == {
        "pseudo_labels/fold1_similarity.png", "pseudo_labels/fold1_summary.json"}


def test_defaults_to_the_checkpoint_fold_and_counts_rejected_patches(tiny, tmp_path):
    root, ckpt = tiny
    params = pl.PseudoLabelParams(patch_size=32, window=[0.0, 0.1], per_case=4, dictionary_size=8,
                                  max_unlabelled_cases=1)
    result = pl.generate_pseudo_labels(ckpt, str(root / "shards"), params, device=CPU)
    counts = result.summary["counts"]
    assert result.summary["fold"] == 1 and counts["unlabelled_cases"] == 1
    assert counts["kept"] == 0 and counts["too_similar"] == counts["patches"] == len(result.best_similarity) > 0
    files = pl.write_outputs(result, tmp_path / "none.pt")
    assert files["histogram"].is_file()
    with pytest.raises(DataError, match="no pseudo labels"):
        pl.load_pseudo_labels(files["labels"])
    with pytest.raises(ConfigError, match="has folds 0..1"):
        pl.generate_pseudo_labels(ckpt, str(root / "shards"), pl.PseudoLabelParams(fold=5, patch_size=32), device=CPU)
    with pytest.raises(ConfigError, match="exceeds the store's slices"):
        pl.generate_pseudo_labels(ckpt, str(root / "shards"), pl.PseudoLabelParams(patch_size=68), device=CPU)


def test_centring_spreads_crowded_cosines():
    """Non-negative codes sharing a large common part all score ~1 raw; centred, they separate."""
    from robustseg.engine.pseudo_labels import centre_codes

    g = torch.Generator().manual_seed(0)
    common = torch.full((1, 16), 5.0)
    dictionary = torch.nn.functional.normalize(common + torch.rand(20, 16, generator=g), dim=1)
    unlabelled = torch.nn.functional.normalize(common + torch.rand(30, 16, generator=g), dim=1)
    raw = (unlabelled @ dictionary.T).max(1).values
    assert float(raw.min()) > 0.99
    u, d = centre_codes(unlabelled, dictionary)
    assert torch.allclose(u.norm(dim=1), torch.ones(30)) and torch.allclose(d.norm(dim=1), torch.ones(20))
    centred = (u @ d.T).max(1).values
    assert float(centred.min()) < 0.9 and float(centred.max() - centred.min()) > 0.1
    # An unlabelled code equal to a dictionary entry still matches it exactly.
    u2, d2 = centre_codes(dictionary[:3], dictionary)
    assert torch.allclose((u2 * d2[:3]).sum(1), torch.ones(3), atol=1e-5)
