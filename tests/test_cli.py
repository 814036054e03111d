"""The `robustseg` command: prepare, inspect, sources, config, demo; errors exit 2 with one line."""
import subprocess
import sys
from pathlib import Path

import pytest

from robustseg.cli import main, parse_source
from robustseg.config import ExperimentConfig
from robustseg.data.manifest import read_manifest
from robustseg.cli.demo import demo_config
from robustseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_parse_source_options():
    spec = parse_source("synthetic_cmr:?n_subjects=3&motion_levels=[0,2]")
    assert spec.name == "synthetic_cmr" and spec.path == "" and spec.options == {"n_subjects": 3, "motion_levels": [0, 2]}
    spec = parse_source("acdc_h5:/data/x:y")
    assert spec.path == "/data/x:y" and spec.options == {}
    with pytest.raises(ConfigError, match="NAME:PATH"):
        parse_source("no-colon")


def test_prepare_then_inspect(tmp_path, capsys):
    out = tmp_path / "store"
    rc = main(["prepare", "--source", "synthetic_cmr:?n_subjects=3&motion_levels=[0]", "--out", str(out),
               "--folds", "3", "data.cmr.crop_size=[96,96]", "data.cmr.target_spacing=[1.5,1.5]"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "prepared 6 cases (3 subjects" in text and "shards: 3 written" in text
    m = read_manifest(str(out))
    assert m.folds["k"] == 3 and (m.layout.height, m.layout.width) == (96, 96)
    assert main(["inspect", str(out), "--cases"]) == 0
    text = capsys.readouterr().out
    assert "6 cases" in text and "syn0000_ED" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "--source", "dicom:/x", "--out", "{tmp}/o"], "unknown source 'dicom'; valid: acdc_h5"),
        (["prepare", "--source", "acdc_h5:{tmp}/missing", "--out", "{tmp}/o"], "missing"),
        (["prepare", "--source", "synthetic_cmr:", "--out", "{tmp}/o", "optim.lrr=1"], "unknown key(s) ['lrr'] in optim"),
        (["inspect", "{tmp}/empty"], "no manifest"),
        (["config", "validate", "--config", "{tmp}/nope.yaml"], "config file not found"),
    ],
)
def test_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_sources_and_config_commands(capsys):
    assert main(["sources"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    for n in ("acdc_h5", "acdc_nifti", "mnms", "cmrxmotion", "ct_nifti", "slices2d", "unlabelled", "synthetic_cmr", "synthetic_ct"):
        assert n in names
    assert main(["config", "explain"]) == 0
    out = capsys.readouterr().out
    assert "data.cmr.clip_percentiles" in out and "model.params (unet2d).filters_max" in out
    assert main(["config", "explain", "regime.name=advchain"]) == 0
    assert "regime.params (advchain).n_iter" in capsys.readouterr().out
    assert main(["config", "show", "optim.lr=0.5"]) == 0
    assert ExperimentConfig.from_dict(__import__("yaml").safe_load(capsys.readouterr().out)).optim.lr == 0.5


def test_demo_config_matches_shipped_yaml():
    shipped = ExperimentConfig.from_yaml(REPO / "configs" / "demo_synthetic.yaml")
    assert shipped == demo_config("robustseg_work/demo", 8)


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--subjects", "3", "--no-sweep"]) == 0
    out = capsys.readouterr().out
    assert "prepared 24 cases (3 subjects" in out and "demo finished" in out
    assert (tmp_path / "demo" / "shards" / "manifest.json").exists()


def test_demo_sweep_validates_every_case_once():
    """The demo's folds are scored on every held-out case, once, after the last epoch."""
    from robustseg.cli.demo import sweep_config

    scfg = sweep_config(demo_config("robustseg_work/demo", 8))
    assert scfg.inference.val_max_cases is None and scfg.inference.val_every == scfg.optim.epochs
    from search_spaces import get_space

    class Trial:  # the one suggestion the demo space makes
        def suggest_float(self, name, lo, hi, log=False):
            assert name == "optim/lr" and lo < hi and log
            return lo

    point = get_space("demo")(Trial())
    assert point["model/name"] == "unet" and point["optim/name"] == "adam"


def test_demo_prints_served_function_beside_the_truth(capsys):
    from robustseg.analysis.clinical import cardiac_function
    from robustseg.cli.demo import mask_dice, print_function
    from robustseg.data.synthetic import make_cardiac_dataset

    ed, es = make_cardiac_dataset(1, seed=2026)[:2]
    truth = cardiac_function(ed.label, es.label, ed.spacing, es.spacing)
    assert 0 < truth["lv_ef"] < 100 and 0 < truth["rv_ef"] < 100
    served = {**truth, "lv_ef": truth["lv_ef"] - 2.0, "rv_ef": None, "flags": []}
    print_function(served, truth)
    out = capsys.readouterr().out
    assert f"EF {truth['lv_ef'] - 2.0:.1f} % (true {truth['lv_ef']:.1f} %, off by -2.0 points)" in out
    assert f"RV: EDV {truth['rv_edv']:.1f} mL (true {truth['rv_edv']:.1f})" in out and "EF n/a %" in out
    lv = ed.label == 1
    assert mask_dice(lv, lv) == 1.0 and mask_dice(lv, ~lv) == 0.0 and mask_dice(lv & False, lv & False) == 1.0


def test_console_script_help():
    exe = Path(sys.executable).with_name("robustseg")
    res = subprocess.run([str(exe), "prepare", "--help"], capture_output=True, text=True, check=True)
    assert "--source NAME:PATH" in res.stdout and "s3://" in res.stdout


# ------------------------------------------------------------------------------ start-up (issue 12)
HEAVY = ("torch", "monai", "ray", "mlflow", "optuna", "SimpleITK")
_HELP_PROBE = """
import argparse, contextlib, io, sys
from robustseg.cli import build_parser, main
parser = build_parser()
sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
for argv in [["--help"]] + [[name, "--help"] for name in sub.choices]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
print(len(sub.choices), " ".join(m for m in HEAVY if m in sys.modules))
"""


def test_help_imports_no_heavy_module():
    """`robustseg --help` and `robustseg <cmd> --help` import the command's code only when it runs."""
    res = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n" + _HELP_PROBE], capture_output=True,
                         text=True, check=True, cwd=REPO)
    n_commands, *imported = res.stdout.split()
    assert int(n_commands) >= 15
    assert imported == [], f"building the parser / --help imported {imported}"


# ------------------------------------------------------------------------------ config validate == train's checks
BAD_CONFIGS = {
    "model": ("model: {params: {filterz_base: 8}}",
              "unknown key(s) ['filterz_base'] in model.params (unet2d); valid keys: ['filters_base'"),
    "regime": ("regime: {name: supervisedd}",
               "regime.name: unknown regime 'supervisedd'; valid: advchain, genesis, mean_teacher, supervised"),
    "augment": ("augment: {preset: nnunett}", "augment.preset: unknown preset 'nnunett'; valid: auto, cardiac, light, nnunet, none"),
}


@pytest.mark.parametrize("section", sorted(BAD_CONFIGS))
def test_config_validate_rejects_what_train_rejects(tmp_path, capsys, section):
    body, message = BAD_CONFIGS[section]
    path = tmp_path / f"bad_{section}.yaml"
    path.write_text(f"data: {{shards_uri: {tmp_path / 'shards'}}}\ntracking: {{workdir: {tmp_path}}}\n{body}\n")
    assert main(["config", "validate", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert f"{path}: {message}" in err and "valid" not in out
    # train refuses it with the same words, before any data is prepared.
    assert main(["train", "--config", str(path), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


def test_config_validate_lists_every_problem(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(body for body, _ in BAD_CONFIGS.values()) + "\n")
    assert main(["config", "validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err and all(message in err for _, message in BAD_CONFIGS.values())


def test_tune_rejects_what_train_rejects_before_starting_ray(tmp_path, capsys, monkeypatch):
    import trainables.ray_session as ray_session

    def no_ray(*_, **__):
        raise AssertionError("tune started Ray for a config that train rejects")

    monkeypatch.setattr(ray_session, "init_ray", no_ray)
    body, message = BAD_CONFIGS["regime"]
    path = tmp_path / "bad_regime.yaml"
    path.write_text(f"data: {{shards_uri: {tmp_path / 'shards'}}}\ntracking: {{workdir: {tmp_path}}}\n{body}\n")
    assert main(["tune", "--config", str(path), "--space", "unet2d", "--trials", "1"]) == 2
    assert f"{path}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists() and not (tmp_path / "ray_results").exists()


@pytest.mark.parametrize("name", sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_validates(capsys, name):
    assert main(["config", "validate", "--config", str(REPO / "configs" / name)]) == 0
    assert capsys.readouterr().out.strip().endswith(": valid")


# ------------------------------------------------------------------------------ read-only commands create no store
def test_read_only_commands_create_no_tracking_store(tmp_path, capsys, monkeypatch):
    from robustseg.data.io import write_with_geometry
    from robustseg.data.synthetic import make_cardiac_dataset

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    typo = tmp_path / "typo" / "mlflow.db"
    case = make_cardiac_dataset(1, seed=3)[0]
    write_with_geometry(case.image, tmp_path / "in" / "p1.nii.gz", case.geometry())
    default = tmp_path / "robustseg_work" / "mlflow.db"  # the default store, relative to the working folder
    runs = [
        (["registry", "list", "--tracking-uri", f"sqlite:///{typo}"], typo),
        (["registry", "list"], default),
        (["registry", "promote", "--version", "1", "--tracking-uri", f"sqlite:///{typo}"], typo),
        (["predict", "--model", "models:/robustseg-cmr@champion", "--tracking-uri", f"sqlite:///{typo}",
          "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--device", "cpu"], typo),
        (["predict", "--model", "models:/robustseg-cmr@champion", "--input", str(tmp_path / "in"),
          "--output", str(tmp_path / "out"), "--device", "cpu"], default),
        (["report", "--sweep", "demo", "--tracking-uri", f"sqlite:///{typo}"], typo),
        (["robustness", "--model", "models:/robustseg-cmr@champion", "--source", "synthetic_cmr:?n_subjects=1",
          "--cases", "1", "--no-tracking", "--tracking-uri", f"sqlite:///{typo}", "--out", str(tmp_path / "rob")],
         typo),
    ]
    for argv, store in runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{store} does not exist (nothing was created)" in err and "Traceback" not in err, (argv, err)
    assert not typo.parent.exists() and not (tmp_path / "robustseg_work").exists()
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".db" or p.name == "mlruns"]


# ------------------------------------------------------------------------------ ensemble predict: one path
def test_ensemble_predict_honours_force_and_fail_fast(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import numpy as np

    import robustseg.ensemble.registry as registry
    from robustseg.data.io import write_with_geometry
    from robustseg.data.synthetic import make_cardiac_dataset
    from robustseg.ensemble import SPEC_FILE

    loaded = []
    spec = SimpleNamespace(task="cardiac", class_names={0: "background", 1: "LV", 2: "MYO", 3: "RV"}, tta=True)
    ens = SimpleNamespace(spec=spec, predict_cases=lambda cases: [(c.image > 0).astype(np.uint8) for c in cases])

    def load_ensemble(model, tracking_uri, device):
        loaded.append((model, tracking_uri))
        return ens, None

    monkeypatch.setattr(registry, "load_ensemble", load_ensemble)
    model = tmp_path / "ens"
    model.mkdir()
    (model / SPEC_FILE).write_text("{}")
    case = make_cardiac_dataset(1, seed=3)[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "b_broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    write_with_geometry(case.label, tmp_path / "in" / "d_volume.nii.gz", case.geometry())  # a label map
    base = ["predict", "--model", str(model), "--input", str(tmp_path / "in"), "--tracking-uri", "sqlite:///x.db",
            "--no-tta", "--device", "cpu", "--output"]
    assert main([*base, str(tmp_path / "forced"), "--force"]) == 2  # b fails, the label map is segmented
    assert [p.name for p in (tmp_path / "forced").iterdir()] == ["d_volume_seg.nii.gz"]
    assert "1 of 2 inputs failed" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "fast"), "--force", "--fail-fast"]) == 2  # stops at b
    assert not list(tmp_path.glob("fast/*"))
    assert "b_broken.nii.gz: corrupt or truncated gzip data" in capsys.readouterr().err
    assert loaded == [(str(model), "sqlite:///x.db")] * 2 and spec.tta is False


# ------------------------------------------------------------------------------ sources are local paths
@pytest.mark.parametrize("uri", ["s3://bucket/x", "gs://bucket/x", "https://example.org/acdc"])
def test_a_uri_as_source_path_says_sources_are_local(tmp_path, capsys, uri):
    assert main(["prepare", "--source", f"acdc_h5:{uri}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"acdc_h5:{uri}: sources are local paths" in err and "folder not found" not in err
    assert len(err.strip().splitlines()) == 1
    assert parse_source(f"acdc_h5:file://{tmp_path}/acdc").path == f"{tmp_path}/acdc"  # file:// is local
