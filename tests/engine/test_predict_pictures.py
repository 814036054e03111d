"""`robustseg predict` on 2D pictures (COVID-SemiSeg-style JPEG slices): PNG masks in the input size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustseg.config import ExperimentConfig
from robustseg.engine.predict import list_inputs, predict_files, write_picture_mask
from robustseg.engine.train import train_from_config
from robustseg.errors import DataError


def _slices(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(0, 80, (48, 40), dtype=np.uint8)
        mask = np.zeros((48, 40), np.uint8)
        mask[10 + i:24 + i, 8:20] = 255
        image[mask > 0] = 220  # a bright "lesion" the model can learn in a few steps
        for sub, arr, ext in (("images", image, "jpg"), ("infection_masks", mask, "png")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / sub / f"{i}.{ext}")
    return root


@pytest.fixture(scope="module")
def picture_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    data = _slices(root / "covid")
    cfg = ExperimentConfig.from_dict({
        "name": "pic",
        "data": {"sources": [{"name": "slices2d", "path": str(data)}], "plan": "slices2d",
                 "slices2d": {"size": [32, 32]}, "shards_uri": str(root / "shards"), "folds": 2},
        "model": {"name": "unet2d", "num_classes": 2, "params": {"filters_base": 4, "filters_max": 16, "max_stages": 3}},
        "optim": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 4},
        "inference": {"tta": False}, "tracking": {"workdir": str(root)},
    })
    res = train_from_config(cfg, out_dir=root / "run", device=torch.device("cpu"))
    return root, data, res.best_checkpoint


def test_predict_jpeg_writes_png_mask_in_input_size(tmp_path, picture_model):
    _, data, ckpt = picture_model
    rows = predict_files(ckpt, data / "images", tmp_path / "out", device=torch.device("cpu"))
    assert len(rows) == 6 and all(r["output"].endswith("_seg.png") for r in rows)
    mask = np.asarray(Image.open(tmp_path / "out" / "0_seg.png"))
    assert mask.shape == (48, 40) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}  # binary masks as the dataset stores them
    assert rows[0]["infection"] == int((mask == 255).sum())


def test_picture_inputs_and_errors(tmp_path, picture_model):
    _, data, _ = picture_model
    assert [p.name for p in list_inputs(data / "images")][:2] == ["0.jpg", "1.jpg"]
    with pytest.raises(DataError, match="needs one slice"):
        write_picture_mask(np.zeros((2, 4, 4), np.uint8), tmp_path / "m.png", "lung_binary")
    write_picture_mask(np.full((1, 4, 4), 2, np.uint8), tmp_path / "multi.png", "lung_multiclass")
    assert np.asarray(Image.open(tmp_path / "multi.png")).max() == 2  # multi-class keeps the label values
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="bad.jpg"):
        predict_files(picture_model[2], tmp_path / "bad.jpg", tmp_path / "o", device=torch.device("cpu"))
