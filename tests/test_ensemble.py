"""Ensembles: spec validation, folder round trip, grouped two-stage inference, weights, vote."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robustseg.data.synthetic import make_cardiac_dataset
from robustseg.engine.checkpoint import CheckpointError
from robustseg.ensemble import Ensemble, EnsembleSpec, MemberSpec
from robustseg.errors import DataError
from tiny_ensemble import tiny_ensemble_folder, tiny_member_checkpoints

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_ensemble_folder(tmp_path_factory.mktemp("ens"))


@pytest.fixture(scope="module")
def cases():
    out = make_cardiac_dataset(2, seed=11)[:3]
    for c in out:
        c.label = None
    return out


def _spec(**kw):
    base = dict(name="e", task="cardiac", class_names={0: "bg", 1: "LV"}, members=[MemberSpec("a", "unet2d")])
    base.update(kw)
    return EnsembleSpec(**base)


@pytest.mark.parametrize("kw, msg", [
    ({"combine": "max"}, "combine must be one of"),
    ({"centring": "heart"}, "centring must be one of"),
    ({"members": []}, "at least one member"),
    ({"members": [MemberSpec("a", "unet2d"), MemberSpec("a", "unet")]}, "unique"),
    ({"members": [MemberSpec("a", "unet2d", weight=0.0)]}, "weight must be positive"),
])
def test_spec_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _spec(**kw)


def test_spec_round_trip_and_unknown_keys():
    spec = _spec(metrics={"oof_dice_ensemble": 0.8})
    assert EnsembleSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="unknown ensemble spec keys \\['colour'\\]"):
        EnsembleSpec.from_dict({**spec.to_dict(), "colour": "red"})


def test_folder_round_trip_predicts_identically(folder, cases, tmp_path):
    ens = Ensemble.load(folder, CPU)
    assert [m.name for m in ens.spec.members] == ["unet2d_0", "unet_1"]
    # Slim members: weights, config and plan, no optimiser state.
    member = torch.load(folder / "members" / "unet2d_0.pt", weights_only=False)
    assert "optimizer" not in member and {"model", "config", "plan"} <= set(member)
    again = Ensemble.load(ens.save(tmp_path / "copy"), CPU)
    a, b = ens.predict_cases(cases[:1]), again.predict_cases(cases[:1])
    assert np.array_equal(a[0], b[0])


def test_labels_on_the_input_grid_and_batching_is_transparent(folder, cases):
    ens = Ensemble.load(folder, CPU)
    labels = ens.predict_cases(cases)
    assert [lab.shape for lab in labels] == [c.image.shape for c in cases]
    assert all(lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 2, 3} for lab in labels)
    # Several volumes in one call (Serve batching) give each volume's own answer.
    for case, lab in zip(cases, labels):
        assert np.array_equal(ens.predict_cases([case])[0], lab)


def test_members_sharing_plan_and_window_run_as_one_group(folder):
    ens = Ensemble.load(folder, CPU)
    assert len(ens.stage2) == 1 and len(ens.stage2[0].predictors) == 2
    # unet (depth 3) needs multiples of 8, the 3-stage unet2d multiples of 4: the group uses both.
    assert ens.stage2[0].divisible_by() == (8, 8)


def test_two_stage_centre_is_the_first_stage_foreground_centroid(folder, cases):
    ens = Ensemble.load(folder, CPU)
    assert ens.needs_centre
    # The locating pass is coarse (no overlap, no TTA): the centre is its foreground centroid.
    probs = ens._combine(ens.stage1, cases[:1], [None], vote=False, coarse=True)[0]
    fg = np.nonzero(ens._labels(probs))
    centre = ens.locate(cases[:1])[0]
    if fg[0].size:
        assert centre == pytest.approx((fg[1].mean(), fg[2].mean()))
    else:
        assert centre is None
    _, used = ens.predict_probabilities(cases[:1])
    assert used == [centre]
    ens.spec.centring = "image"
    assert not ens.needs_centre and ens.predict_probabilities(cases[:1])[1] == [None]


def test_weights_shift_the_mean_towards_a_member(folder, cases):
    ens = Ensemble.load(folder, CPU)
    ens.spec.centring = "image"
    only_first = Ensemble(EnsembleSpec.from_dict({**ens.spec.to_dict(), "members": [ens.spec.to_dict()["members"][0]]}),
                          ens.predictors[:1])
    d = ens.spec.to_dict()
    d["members"][1]["weight"] = 1e-9
    heavy = Ensemble(EnsembleSpec.from_dict(d), ens.predictors)
    p_first, _ = only_first.predict_probabilities(cases[:1])
    p_heavy, _ = heavy.predict_probabilities(cases[:1])
    p_equal, _ = ens.predict_probabilities(cases[:1])
    assert np.allclose(p_heavy[0], p_first[0], atol=1e-5)
    assert not np.allclose(p_equal[0], p_first[0], atol=1e-3)


def test_vote_of_one_member_equals_its_mean(folder, cases):
    ens = Ensemble.load(folder, CPU)
    d = ens.spec.to_dict()
    d["members"] = d["members"][:1]
    d["centring"] = "image"
    mean = Ensemble(EnsembleSpec.from_dict(d), ens.predictors[:1]).predict_cases(cases[:1])[0]
    d["combine"] = "vote"
    vote = Ensemble(EnsembleSpec.from_dict(d), ens.predictors[:1]).predict_cases(cases[:1])[0]
    assert np.array_equal(mean, vote)


def test_bad_inputs_and_folders(folder, cases, tmp_path):
    ens = Ensemble.load(folder, CPU)
    ct = cases[0]
    hu = np.full(ct.image.shape, -1000.0, np.float32)  # air around a 40 HU body: a CT, not an MR
    hu[:, 20:-20, 20:-20] = 40.0
    ct_like = type(ct)(**{**ct.__dict__, "image": hu})
    with pytest.raises(DataError, match="looks like CT"):
        ens.predict_cases([ct_like])
    with pytest.raises(CheckpointError, match="no ensemble spec"):
        Ensemble.load(tmp_path, CPU)
    (tmp_path / "spec.json").write_text(json.dumps({**ens.spec.to_dict(), "combine": "max"}))
    with pytest.raises(CheckpointError, match="invalid ensemble spec"):
        Ensemble.load(tmp_path, CPU)


def test_from_checkpoints_defaults(folder):
    ckpts = tiny_member_checkpoints(folder.parent)
    ens = Ensemble.from_checkpoints(ckpts, device=CPU, combine="vote")
    assert ens.spec.combine == "vote" and ens.spec.task == "cardiac"
    assert ens.spec.label_convention == "cardiac: 0 background, 1 LV, 2 MYO, 3 RV"
    assert [m.fold for m in ens.spec.members] == [0, 1]


def test_cli_ensemble_from_checkpoints_saves_and_registers(folder, cases, tmp_path, capsys):
    """`robustseg ensemble --checkpoints`: given models -> folder (same masks as in process) -> registry."""
    from robustseg.cli import main
    from robustseg.ensemble.registry import list_versions, load_ensemble

    ckpts = tiny_member_checkpoints(folder.parent)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["ensemble", "--checkpoints", *map(str, ckpts), "--out", str(tmp_path / "ens"), "--name", "tiny-ck",
               "--tracking-uri", uri, "--device", "cpu"])
    assert rc == 0
    ens, _ = load_ensemble(str(tmp_path / "ens"), device=torch.device("cpu"))
    assert [m.source for m in ens.spec.members] == [str(c) for c in ckpts]
    direct = Ensemble.from_checkpoints(ckpts, device=torch.device("cpu"))
    assert np.array_equal(ens.predict_cases(cases[:1])[0], direct.predict_cases(cases[:1])[0])
    assert [v["version"] for v in list_versions("tiny-ck", uri)] == ["1"]
    capsys.readouterr()
    assert main(["ensemble", "--checkpoints", str(ckpts[0]), "--no-tracking"]) != 0
    assert "needs --out FOLDER" in capsys.readouterr().err
    assert main(["ensemble"]) != 0
    assert "--sweep (a sweep's fold models) or --checkpoints" in capsys.readouterr().err
