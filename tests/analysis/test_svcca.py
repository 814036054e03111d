"""SVCCA: the numbers on synthetic activations, layer discovery and capture, the CLI end to end."""
from __future__ import annotations

import argparse
import json
from typing import List

import numpy as np
import pytest
import torch

from robustseg.analysis import svcca as sv
from robustseg.analysis.svcca_runs import choose_slices, fit_to_patch, mlflow_metrics
from robustseg.cli.analysis import register
from robustseg.config import ConfigError
from robustseg.engine.checkpoint import CheckpointError, save_checkpoint
from robustseg.models import build_model
from tiny import tiny_cfg

TINY_LAYERS = ["net.input_block", "net.downsamples.0", "net.bottleneck", "net.upsamples.0", "net.upsamples.1",
               "net.output_block"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny networks: on a shared CPU, more intra-op threads cost more in contention than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, n)))[0]


# --------------------------------------------------------------------------- the numbers
def test_identical_activations_score_one():
    x = np.random.default_rng(0).standard_normal((500, 20))
    r = sv.svcca(x, x)
    assert r.mean == pytest.approx(1.0, abs=1e-6) and np.allclose(r.correlations, 1.0, atol=1e-6)
    assert r.n_points == 500 and r.dims_a == r.dims_b <= 20 and not r.underdetermined


def test_invariant_to_invertible_linear_maps_and_offsets():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((800, 12))
    # Well conditioned (singular values 1..3) but far from orthogonal: every neuron is mixed.
    m = _orthogonal(12, rng) @ np.diag(np.linspace(1.0, 3.0, 12)) @ _orthogonal(12, rng)
    r = sv.svcca(x, x @ m + 5.0, keep=1.0)
    assert r.mean == pytest.approx(1.0, abs=1e-6) and r.dims_a == r.dims_b == 12


def test_independent_activations_score_near_zero():
    rng = np.random.default_rng(2)
    r = sv.svcca(rng.standard_normal((5000, 10)), rng.standard_normal((5000, 10)))
    assert r.mean < 0.2 and r.correlations.max() < 0.2


def test_partially_shared_subspace_scores_the_shared_fraction():
    rng = np.random.default_rng(3)
    n, shared, width = 20000, 4, 10
    z = rng.standard_normal((n, shared))
    a = np.hstack([z, rng.standard_normal((n, width - shared))]) @ _orthogonal(width, rng)
    b = np.hstack([z, rng.standard_normal((n, width - shared))]) @ _orthogonal(width, rng)
    r = sv.svcca(a, b)
    assert r.dims_a == r.dims_b == width  # equal variances: 99 % needs every direction
    assert np.all(r.correlations[:shared] > 0.999) and np.all(r.correlations[shared:] < 0.1)
    assert r.mean == pytest.approx(shared / width, abs=0.03)


def test_sv_step_keeps_the_directions_that_explain_the_variance():
    rng = np.random.default_rng(4)
    latent = rng.standard_normal((1000, 5))
    latent = (latent - latent.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(latent.T)).T)  # exactly white
    x = (latent * [10.0, 5.0, 3.0, 2.0, 1.0]) @ np.linalg.qr(rng.standard_normal((20, 5)))[0].T  # rank 5 in 20 neurons
    # Variances 100, 25, 9, 4, 1 of 139: cumulative 0.719, 0.899, 0.964, 0.993, 1.
    assert [sv.svd_reduce(x, keep).shape[1] for keep in (0.7, 0.95, 0.99, 1.0)] == [1, 3, 4, 5]
    reduced = sv.svd_reduce(x, 0.99)
    assert np.allclose(reduced.std(0, ddof=1), [10.0, 5.0, 3.0, 2.0], rtol=1e-6)
    # svcca is the mean CCA of the two reduced subspaces.
    y = x @ rng.standard_normal((20, 12)) + 0.5 * rng.standard_normal((1000, 12))
    r = sv.svcca(x, y)
    assert r.dims_a == 4
    assert r.mean == pytest.approx(sv.cca(sv.svd_reduce(x), sv.svd_reduce(y)).mean(), abs=1e-9)


def test_more_neurons_than_datapoints():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 100))
    r = sv.svcca(x, x @ rng.standard_normal((100, 100)), keep=1.0)
    assert r.dims_a == r.dims_b == 29 and r.mean == pytest.approx(1.0, abs=1e-6)  # centring costs one direction
    noise = sv.svcca(x, rng.standard_normal((30, 100)))
    assert noise.underdetermined and noise.mean > 0.9  # the documented trap: too few datapoints
    assert len(sv.cca(x, rng.standard_normal((30, 3)))) == 3


def test_conv_maps_give_one_datapoint_per_position():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    pts = sv.as_datapoints(x)
    assert pts.shape == (40, 3) and np.array_equal(pts[1 * 20 + 2 * 5 + 3], x[1, :, 2, 3].numpy())
    rng = np.random.default_rng(6)
    maps = torch.from_numpy(rng.standard_normal((6, 8, 16, 16)))
    mixed = torch.einsum("dc,nchw->ndhw", torch.from_numpy(rng.standard_normal((8, 8)) + 3 * np.eye(8)), maps)
    r = sv.svcca(maps, mixed, keep=1.0, max_points=500)  # a 1x1 convolution is a linear map of the channels
    assert r.n_points == 500 and r.mean == pytest.approx(1.0, abs=1e-6)
    rows = sv.subsample_rows(1536, 500, seed=0)
    assert len(set(rows.tolist())) == 500 and np.array_equal(rows, sv.subsample_rows(1536, 500, seed=0))


def test_bad_inputs_fail_clearly():
    x = np.random.default_rng(7).standard_normal((50, 4))
    with pytest.raises(ValueError, match="same datapoints"):
        sv.svcca(x, x[:40])
    with pytest.raises(ValueError, match="constant"):
        sv.svcca(x, np.ones((50, 3)))
    with pytest.raises(ValueError, match="keep"):
        sv.svcca(x, x, keep=1.5)
    with pytest.raises(ValueError, match="shape"):
        sv.as_datapoints(np.zeros(5))
    with pytest.raises(ConfigError, match="keep"):
        sv.SVCCAOptions(keep=0.0)


def test_feature_layout():
    assert sv.feature_layout((2, 8, 32, 32), (64, 64)) == "cf"
    assert sv.feature_layout((2, 56, 56, 96), (224, 224)) == "cl"  # a Swin stage
    assert sv.feature_layout((2, 224, 224, 16), (224, 224)) == "cl"  # (224, 16) fits too, but unevenly
    assert sv.feature_layout((2, 32, 32, 32), (64, 64)) == "cf"  # truly ambiguous: channel-first
    assert sv.feature_layout((2, 8, 4, 4, 4), (16, 16, 16)) == "cf"
    assert sv.feature_layout((2, 10), (64, 64)) == "vector"
    assert sv.feature_layout((2, 49, 96), (224, 224)) is None  # tokens


# --------------------------------------------------------------------------- layers and capture
def _tiny_unet2d(tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(tmp_path).model, (64, 64)).eval()


def test_default_layers_and_capture_on_tiny_unet2d(tmp_path):
    model = _tiny_unet2d(tmp_path)
    layers = sv.default_layers(model, torch.randn(1, 1, 64, 64))
    assert [(info.name, info.shape) for info in layers] == [
        ("net.input_block", (4, 64, 64)), ("net.downsamples.0", (8, 32, 32)), ("net.bottleneck", (16, 16, 16)),
        ("net.upsamples.0", (8, 32, 32)), ("net.upsamples.1", (4, 64, 64)), ("net.output_block", (4, 64, 64))]
    x = torch.randn(3, 1, 64, 64)
    acts = sv.capture_activations(model, x, TINY_LAYERS, max_grid=32, batch_size=2)
    assert {k: tuple(v.shape) for k, v in acts.items()} == {
        "net.input_block": (3, 4, 32, 32), "net.downsamples.0": (3, 8, 32, 32), "net.bottleneck": (3, 16, 16, 16),
        "net.upsamples.0": (3, 8, 32, 32), "net.upsamples.1": (3, 4, 32, 32), "net.output_block": (3, 4, 32, 32)}
    with torch.no_grad():
        logits = model(x)
    full = sv.capture_activations(model, x, ["net.output_block"], max_grid=64)["net.output_block"]
    assert torch.allclose(full, logits, atol=1e-5)  # the hooked output is the network's output
    assert torch.allclose(acts["net.output_block"], torch.nn.functional.avg_pool2d(logits, 2), atol=1e-5)
    with pytest.raises(ConfigError, match=r"'net.bottlenek'.*did you mean net.bottleneck"):
        sv.capture_activations(model, x, ["net.bottlenek"])
    with pytest.raises(ConfigError, match="runs more than once"):
        sv.capture_activations(model, x, ["net.input_block.lrelu"])  # shared by both convolutions


@pytest.mark.parametrize("name,params,patch", [
    ("unet", {"base": 4, "depth": 3}, (64, 64)),
    ("attention_unet", {"channels": [4, 8, 16], "strides": [2, 2]}, (64, 64)),
    ("swin_unet", {"embed_dim": 12, "num_heads": [1, 2, 2, 2], "depths": [1, 1, 1, 1]}, (224, 224)),
])
def test_default_layers_of_other_backbones(name, params, patch):
    from robustseg.config import ModelConfig

    model = build_model(ModelConfig(name=name, params=params), patch).eval()
    layers = sv.default_layers(model, torch.randn(1, 1, *patch))
    names = [info.name for info in layers]
    expected_first_last = {"unet": ("down.0", "head"), "attention_unet": ("model.0", "model.2"),
                           "swin_unet": ("patch_embed.proj", "seg_head.3")}[name]
    assert (names[0], names[-1]) == expected_first_last and len(names) >= 6
    assert len(set(names)) == len(names) and layers[-1].shape == (4, *patch)  # the logits come last
    if name == "swin_unet":  # channel-last stages are recognised and stored channel-first
        assert [i.channels_last for i in layers if i.name.startswith("layers.")] == [True] * 4
        assert layers[1].shape == (12, 56, 56)
    acts = sv.capture_activations(model, torch.randn(2, 1, *patch), names, max_grid=8)
    assert all(acts[i.name].shape == (2, i.shape[0], *[min(s, 8) for s in i.shape[1:]]) for i in layers)


def test_layer_space_compares_on_the_coarser_grid(tmp_path):
    a, b = _tiny_unet2d(tmp_path, 0), _tiny_unet2d(tmp_path, 1)
    x = torch.randn(4, 1, 64, 64)
    opts = sv.SVCCAOptions(max_points=2000)
    sa = sv.LayerSpace(sv.capture_activations(a, x, TINY_LAYERS), opts)
    sb = sv.LayerSpace(sv.capture_activations(b, x, TINY_LAYERS), opts)
    same = sv.layer_similarity(sa, sa, TINY_LAYERS)
    assert all(r.mean == pytest.approx(1.0, abs=1e-6) for r in same.values())
    r = sv.compare_layers(sa, "net.input_block", sb, "net.bottleneck")
    assert r.n_points == 4 * 16 * 16  # the 32 x 32 side pooled to the bottleneck's 16 x 16
    m = sv.similarity_matrix(sa, sb, TINY_LAYERS, TINY_LAYERS[:3])
    assert m.shape == (6, 3) and m[0, 2] == pytest.approx(r.mean) and ((m >= 0) & (m <= 1)).all()


# --------------------------------------------------------------------------- probe helpers
def test_probe_choice_is_deterministic_and_prefers_foreground():
    ids = ["b"] * 5 + ["a"] * 5
    idx = list(range(5)) * 2
    fg = [False, True, True, False, False, True, False, False, True, True]
    assert choose_slices(ids, idx, fg, 3) == [5, 9, 2]  # a/0, a/4, b/2: spread over the 5 foreground slices
    assert choose_slices(ids, idx, fg, 7) == [5, 6, 8, 9, 1, 2, 4]  # all 5 + 2 spread over the rest
    assert choose_slices(ids, idx, fg, 50) == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    img = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    out = fit_to_patch(img, (4, 6))
    assert out.shape == (2, 4, 6) and torch.equal(out[:, :, 1:5], img[:, 1:5])
    assert torch.equal(out[:, :, 0], img[:, 1:5].flatten(1).min(1).values[:, None].expand(2, 4))  # the crop's minimum


# --------------------------------------------------------------------------- the CLI
def _interpolate(a, b, t: float):
    return {k: (1 - t) * a[k] + t * b[k] if a[k].is_floating_point() else b[k] for k in a}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny store and two unet2d run folders written with fit's checkpoint payload.

    ``scratch``: epoch 1 = random init, epoch 2 = half way, epoch 3 (last = best) = the final
    weights. ``finetuned``: starts from scratch's final weights (its snapshot 1) and ends
    elsewhere (best.pt).
    """
    from robustseg.data.manifest import read_manifest
    from robustseg.data.prepare import prepare

    root = tmp_path_factory.mktemp("svcca")
    cfg = tiny_cfg(root)
    prepare(cfg.data)
    manifest = read_manifest(cfg.data.shards_uri)
    states = []
    for seed in (1, 0, 2):
        torch.manual_seed(seed)
        states.append(build_model(cfg.model, (64, 64)).state_dict())
    init, final, other = states

    def write(path, state, epoch):
        save_checkpoint(path, {
            "backbone": cfg.model.name, "model": state, "epoch": epoch,
            "best": {"score": 0.5, "epoch": epoch, "bad_epochs": 0}, "history": [], "config": cfg.to_dict(),
            "patch_size": [64, 64], "spacing": [1.5, 1.5], "class_names": {1: "RV", 2: "MYO", 3: "LV"},
            "plan": manifest.plan, "layout": manifest.layout.to_dict(), "manifest_uri": manifest.uri,
            "task": manifest.task})

    scratch, tuned = root / "runs" / "scratch" / "fold0", root / "runs" / "finetuned" / "fold0"
    write(scratch / "snapshots" / "epoch_0001.pt", init, 1)
    write(scratch / "snapshots" / "epoch_0002.pt", _interpolate(init, final, 0.5), 2)
    write(scratch / "last.pt", final, 3)
    write(scratch / "best.pt", final, 3)
    write(tuned / "snapshots" / "epoch_0001.pt", final, 1)
    write(tuned / "best.pt", other, 2)
    return root, scratch, tuned


def _run_cli(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="robustseg")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", "svcca", *argv])
    return args.fn(args)


def test_cli_two_runs_end_to_end(runs, tmp_path, capsys):
    from mlflow import MlflowClient

    root, scratch, tuned = runs
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    assert _run_cli(["--runs", str(scratch), str(tuned), "--max-slices", "8", "--max-points", "2048", "--out", str(out),
                     "--tracking-uri", uri, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "scratch/fold0: SVCCA similarity to the converged model (epoch 3)" in text and "best match" in text
    doc = json.loads((out / "svcca.json").read_text())
    assert doc["probe"]["n"] == 8 and doc["probe"]["fold"] == 0 and doc["probe"]["store"].endswith("shards")
    assert doc["layers"]["scratch/fold0"] == TINY_LAYERS
    curve = doc["training"]["scratch/fold0"]
    assert curve["epochs"] == [1, 2, 3] and curve["reference"] == str(scratch / "best.pt")
    for layer, values in curve["similarity"].items():
        assert values[2] == pytest.approx(1.0, abs=1e-6)  # last.pt holds the converged weights
        assert values[0] < 0.999  # random init is another representation
    assert doc["training"]["finetuned/fold0"]["epochs"] == [1]
    pair = doc["pair"]
    assert (pair["a"], pair["b"]) == ("scratch/fold0", "finetuned/fold0")
    assert np.array(pair["matrix"]).shape == (6, 6) and set(pair["matched"]) == set(TINY_LAYERS)
    # finetuned's epoch 1 is scratch's converged model: the same number from both sides.
    assert doc["training"]["finetuned/fold0"]["similarity"]["net.bottleneck"][0] == pytest.approx(
        pair["matched"]["net.bottleneck"], abs=1e-6)
    for png in ("svcca_training.png", "svcca_heatmap.png"):
        assert (out / png).stat().st_size > 5000

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("analysis").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["robustseg.role"] == "svcca"
    key = "svcca_net.bottleneck_scratch-fold0"
    history = client.get_metric_history(run.info.run_id, key)
    assert [(m.step, round(m.value, 6)) for m in history] == [
        (e, round(v, 6)) for e, v in zip(curve["epochs"], curve["similarity"]["net.bottleneck"])]
    assert run.data.metrics["svcca_pair_net.output_block"] == pytest.approx(pair["matched"]["net.output_block"])
    assert run.data.params["fold"] == "0" and run.data.params["layers"] == "default"
    names = {f.path for f in client.list_artifacts(run.info.run_id, "svcca")}
    assert names == {f"svcca/{n}" for n in ("svcca.json", "svcca_training.png", "svcca_heatmap.png")}


def test_cli_checkpoint_files_explicit_layers_and_probe(runs, tmp_path):
    root, scratch, tuned = runs
    out = tmp_path / "out"
    assert _run_cli(["--runs", f"A={scratch / 'best.pt'}", f"B={tuned / 'best.pt'}", "--layers", "net.bottleneck",
                     "net.output_block", "--probe", str(root / "shards"), "--fold", "1", "--max-slices", "4",
                     "--out", str(out), "--no-tracking", "--device", "cpu"]) == 0
    doc = json.loads((out / "svcca.json").read_text())
    assert doc["training"] == {} and doc["probe"]["fold"] == 1 and doc["probe"]["n"] == 4
    assert doc["pair"]["layers_a"] == doc["pair"]["layers_b"] == ["net.bottleneck", "net.output_block"]
    assert (out / "svcca_heatmap.png").is_file() and not (out / "svcca_training.png").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_mlflow_metric_names_for_one_timeline():
    curve = sv.TrainingCurve("scratch/fold0", "best.pt", 3, epochs=[1, 3], similarity={"net.bottleneck": [0.4, 1.0]})
    assert mlflow_metrics([curve], None) == [("svcca_net.bottleneck", 0.4, 1), ("svcca_net.bottleneck", 1.0, 3)]


def test_cli_errors(runs, tmp_path):
    root, scratch, tuned = runs
    with pytest.raises(ConfigError, match=r"no module\(s\) 'net.nope'.*default blocks net.input_block"):
        _run_cli(["--runs", str(scratch), "--layers", "net.nope", "--max-slices", "2", "--no-tracking",
                  "--out", str(tmp_path / "o")])
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        _run_cli(["--runs", str(scratch / "missing.pt"), "--no-tracking"])
    with pytest.raises(CheckpointError, match="no best.pt or last.pt"):
        _run_cli(["--runs", str(scratch / "snapshots"), "--no-tracking"])
    with pytest.raises(ConfigError, match="single checkpoint has nothing to compare"):
        _run_cli(["--runs", str(tuned / "best.pt"), "--no-tracking"])
    with pytest.raises(ConfigError, match="has folds 0..1"):
        _run_cli(["--runs", str(scratch), "--fold", "5", "--no-tracking"])
