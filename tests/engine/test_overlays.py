"""Validation overlays explain themselves: a colour legend naming LV/MYO/RV, the case, its phase
and its Dice in the title, and ES drawn as well as ED (the figure's texts, not its pixels)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

from robustseg.engine import plots
from robustseg.engine.plots import LABEL_COLOURS, overlay_figure, overlay_title, plot_overlay
from robustseg.engine.validate import overlay_picks, write_validation_artifacts


def _volume(shift: int = 0) -> Dict[str, np.ndarray]:
    image = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)
    gt = np.zeros((3, 32, 32), np.uint8)
    gt[:, 8:16, 8:16] = 2  # MYO ring around the LV
    gt[:, 10:14, 10:14] = 1
    gt[:, 18:26, 8:20] = 3
    pred = np.roll(gt, shift, axis=2)
    return {"image": image, "gt": gt, "pred": pred}


def test_overlay_figure_has_a_structure_legend_and_a_title() -> None:
    import matplotlib.pyplot as plt

    v = _volume()
    fig = overlay_figure(v["image"], v["pred"], v["gt"], title=overlay_title("syn0003_ES_m2", "ES", {"LV": 0.9}))
    try:
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ["LV", "MYO", "RV"]
        colours = [to_hex(h.get_facecolor(), keep_alpha=False) for h in legend.legend_handles]
        assert colours == [LABEL_COLOURS[1], LABEL_COLOURS[2], LABEL_COLOURS[3]]
        assert fig._suptitle.get_text() == "syn0003_ES_m2 · ES · Dice LV 0.900"
        assert {ax.get_title() for ax in fig.axes} >= {"prediction z=0", "ground truth z=0"}
    finally:
        plt.close(fig)


def test_overlay_legend_uses_the_given_class_names() -> None:
    import matplotlib.pyplot as plt

    v = _volume()
    fig = overlay_figure(v["image"], v["pred"] > 0, None, class_names={0: "background", 1: "lung"})
    try:
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lung"]
    finally:
        plt.close(fig)


def test_plot_overlay_computes_the_dice_for_its_title(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    titles: List[str] = []
    real = plots.overlay_figure

    def spy(*args: Any, **kwargs: Any) -> Any:
        titles.append(kwargs["title"])
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "overlay_figure", spy)
    v = _volume(shift=1)
    out = plot_overlay(v["image"], v["pred"], v["gt"], tmp_path / "case.png", case_id="syn0001_ED", phase="ED")
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    title = titles[0]
    assert title.startswith("syn0001_ED · ED · Dice LV ") and ", MYO " in title and ", RV " in title
    lv = float(title.split("Dice LV ")[1].split(",")[0])
    assert 0.0 < lv < 1.0  # shifted by a pixel: overlapping, not identical


def test_overlay_picks_alternate_the_phases() -> None:
    cases = [{"phase": p} for p in ("ED", "ED", "ED", "ED", "ES", "ES")]
    assert overlay_picks(cases, 4) == [0, 4, 1, 5]
    assert overlay_picks([{"phase": "ED"}] * 3, 4) == [0, 1, 2]
    assert overlay_picks([{}, {"phase": "ES"}], 1) == [0]


def test_validation_overlays_include_es_and_name_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[Dict[str, Any]] = []
    monkeypatch.setattr(plots, "plot_overlay", lambda *a, **kw: calls.append(kw))
    v = _volume()
    # The order validation cases arrive in: one subject's ED volumes (motion levels), then its ES ones.
    ids = ["syn0_ED", "syn0_ED_m1", "syn0_ED_m2", "syn0_ED_m3", "syn0_ES", "syn0_ES_m1"]
    cases = [{"case_id": c, "phase": c.split("_")[1], "image": torch.from_numpy(v["image"]),
              "label": torch.from_numpy(v["gt"])} for c in ids]
    collected = [{"row": {"case_id": c, "phase": c.split("_")[1], "dice_LV": 0.9, "dice_MYO": 0.8, "dice_RV": 0.7},
                  "pred": v["pred"]} for c in ids]
    write_validation_artifacts(collected, cases, tmp_path, n_overlays=4,
                               class_names={0: "background", 1: "LV", 2: "MYO", 3: "RV"})
    assert [c["case_id"] for c in calls] == ["syn0_ED", "syn0_ES", "syn0_ED_m1", "syn0_ES_m1"]
    assert [c["phase"] for c in calls] == ["ED", "ES", "ED", "ES"]
    assert calls[1]["dice"] == {"LV": 0.9, "MYO": 0.8, "RV": 0.7}
    assert (tmp_path / "val_cases.csv").is_file()
