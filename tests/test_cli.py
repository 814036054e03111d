"""The `robustseg` command: prepare, inspect, sources, config, demo; errors exit 2 with one line."""
import subprocess
import sys
from pathlib import Path

import pytest

from robustseg.cli import main, parse_source
from robustseg.config import ExperimentConfig
from robustseg.data.manifest import read_manifest
from robustseg.demo import demo_config
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


def test_console_script_help():
    exe = Path(sys.executable).with_name("robustseg")
    res = subprocess.run([str(exe), "prepare", "--help"], capture_output=True, text=True, check=True)
    assert "--source NAME:PATH" in res.stdout and "s3://" in res.stdout
