from pathlib import Path

import pytest
import torch
import yaml

from robustseg.config import ExperimentConfig, apply_overrides, explain
from robustseg.engine.optim import build_optimizer
from robustseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_round_trip_dict_and_yaml(tmp_path):
    cfg = ExperimentConfig()
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    p = tmp_path / "c.yaml"
    cfg.to_yaml(p)
    assert ExperimentConfig.from_yaml(p) == cfg


def test_dotted_overrides_parse_values():
    cfg = ExperimentConfig().with_overrides(
        ["optim.lr=1e-3", "data.cmr.crop_size=[224,224]", "optim.compile=true", "data.label_budget=null",
         "model.name=attention_unet", "model.params.channels=[8,16,32,64,128]", "data.stratify=dataset"]
    )
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.cmr.crop_size == [224, 224]
    assert cfg.optim.compile is True
    assert cfg.data.label_budget is None
    assert cfg.model.params == {"channels": [8, 16, 32, 64, 128]}
    assert cfg.data.stratify == "dataset"


def test_optimiser_default_is_adamw_and_lr_follows_the_optimiser():
    cfg = ExperimentConfig()
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.initial_lr) == ("adamw", None, 2e-3)
    # Naming nnU-Net's optimiser alone gives its learning rate, not AdamW's.
    sgd = cfg.with_overrides(["optim.name=sgd_nesterov"])
    assert (sgd.optim.name, sgd.optim.initial_lr) == ("sgd_nesterov", 1e-2)
    assert sgd.with_overrides(["optim.lr=5e-4"]).optim.initial_lr == 5e-4
    assert ExperimentConfig.from_dict(sgd.to_dict()).optim.initial_lr == 1e-2
    assert ExperimentConfig.from_dict({"optim": {"name": "adam"}}).optim.initial_lr == 2e-3
    opt = build_optimizer(sgd.optim, [torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 1e-2
    opt = build_optimizer(cfg.optim, [torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 2e-3


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"optim": {"lrr": 1.0}})
    assert "unknown key(s) ['lrr'] in optim" in str(e.value)
    assert "'lr'" in str(e.value) and "'weight_decay'" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['oops'\] in config"):
        ExperimentConfig.from_dict({"oops": 1})
    with pytest.raises(ConfigError, match=r"in data.cmr"):
        ExperimentConfig().with_overrides(["data.cmr.crop=[1,2]"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("optim.epochs=2.5", "optim.epochs must be an integer"),
        ("optim.name=rmsprop", "optim.name must be one of"),
        ("data.plan=mri", "data.plan: unknown preprocessing plan 'mri'; valid: cmr, ct, slices2d"),
        ("data.folds=1", "data.folds must be >= 2"),
        ("data.cmr.clip_percentiles=[99,1]", "clip_percentiles"),
        ("data.cmr.crop_size=[4,4]", "crop_size"),
        ("data.ct.hu_window=[250,-1250]", "hu_window"),
        ("optim.compile=maybe", "optim.compile must be true or false"),
        ("data.sources=[{path: x}]", "a source name is required"),
        ("inference.val_max_cases=0", "inference.val_max_cases must be >= 1, got 0; leave it out"),
    ],
)
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        ExperimentConfig().with_overrides([override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"optim": {"lr": 1}}, ["optim.lr.x=2"])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        ExperimentConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found"):
        ExperimentConfig.from_yaml(tmp_path / "missing.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        ExperimentConfig.from_yaml(lst)
    unk = tmp_path / "unk.yaml"
    unk.write_text("data: {folds: 3, foldz: 2}\n")
    with pytest.raises(ConfigError, match=r"unk.yaml: unknown key\(s\) \['foldz'\] in data"):
        ExperimentConfig.from_yaml(unk)


def test_mutable_defaults_are_not_shared():
    a, b = ExperimentConfig(), ExperimentConfig()
    a.data.cmr.crop_size.append(3)
    assert b.data.cmr.crop_size == [256, 256]


def test_every_field_is_documented():
    rows = explain()
    assert len(rows) > 40
    undocumented = [k for k, _, d in rows if not d]
    assert undocumented == []


SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_folder_ships_yaml():
    assert len(SHIPPED) >= 10, "configs/ ships the recipes"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_loads_and_builds_its_model(path):
    """As torchtune checks its recipes: each YAML (with its base: files) passes the load-time
    check whole, round-trips, and its backbone builds from its params (on the meta device:
    shapes and wiring without memory)."""
    import torch

    from robustseg.models import build_model, spatial_dims

    cfg = ExperimentConfig.from_yaml(path)
    assert cfg.to_dict() == yaml.safe_load(cfg.to_yaml())
    hw = list(cfg.inference.patch_size or [128, 128])[-2:]
    patch = hw if spatial_dims(cfg.model.name) == 2 else [8, *hw]
    with torch.device("meta"):
        model = build_model(cfg.model, patch)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert model.spatial_dims == len(patch)


@pytest.mark.parametrize("section, value, message", [
    ("model.params.filterz_base", "8", r"unknown key\(s\) \['filterz_base'\] in model.params \(unet2d\); valid keys: "
                                       r"\['filters_base'"),
    ("regime.name", "nope", r"regime.name: unknown regime 'nope'; valid: advchain, genesis, mean_teacher, supervised"),
    ("augment.preset", "heavy", r"augment.preset: unknown preset 'heavy'; valid: auto, cardiac, light, nnunet, none"),
    ("data.sources", "[{name: dicom, path: x}]", r"data.sources\[0\].name: unknown source 'dicom'; valid: acdc_h5, "),
    ("data.sources", "[{name: acdc_h5, path: x, options: {spacingg: 1}}]",
     r"data.sources\[0\] \(acdc_h5\): unknown option\(s\) \['spacingg'\]; valid: \['spacing'\]"),
    ("data.plan", "mri", r"data.plan: unknown preprocessing plan 'mri'; valid: cmr, ct, slices2d"),
    ("regime.params.lr_adv", "0.1", r"unknown key\(s\) \['lr_adv'\] in regime.params \(supervised\)"),
])
def test_a_bad_component_fails_at_load_naming_the_file_and_the_choices(tmp_path, section, value, message):
    p = tmp_path / "run.yaml"
    p.write_text(f"base: {REPO / 'configs' / 'acdc_budget.yaml'}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: " + message):
        ExperimentConfig.from_yaml(p, [f"{section}={value}"])
    # The same check guards a dict (a Ray worker's payload) and overrides of a built config.
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict(apply_overrides(ExperimentConfig().to_dict(), [f"{section}={value}"]))
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig().with_overrides([f"{section}={value}"])


def test_every_component_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        ExperimentConfig().with_overrides(["model.name=unet9", "regime.name=nope", "augment.preset=heavy",
                                           "data.sources=[{name: dicom, path: x}]"])
    text = str(e.value)
    assert text.startswith("4 problems:")
    for part in ("model.name: unknown backbone 'unet9'", "regime.name: unknown regime 'nope'",
                 "augment.preset: unknown preset 'heavy'", "data.sources[0].name: unknown source 'dicom'"):
        assert part in text


def test_base_files_merge_under_the_config(tmp_path):
    from robustseg.config import ConfigError, ExperimentConfig

    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "optim.yaml").write_text("optim: {name: adam, lr: 0.0002, epochs: 500}\n")
    (tmp_path / "presets" / "data.yaml").write_text("data: {folds: 3, split_seed: 4}\noptim: {lr: 0.001}\n")
    (tmp_path / "run.yaml").write_text("base: [presets/optim.yaml, presets/data.yaml]\noptim: {epochs: 20}\nname: r\n")
    cfg = ExperimentConfig.from_yaml(tmp_path / "run.yaml", ["optim.batch_size=3"])
    # later base beats earlier, the file beats its bases, overrides beat everything
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == ("adam", 0.001, 20, 3)
    assert (cfg.data.folds, cfg.data.split_seed, cfg.name) == (3, 4, "r")
    (tmp_path / "other.yaml").write_text("base: run.yaml\nmodel: {name: attention_unet, params: {channels: [4, 8]}}\n")
    (tmp_path / "run.yaml").write_text("base: presets/optim.yaml\nmodel: {name: unet2d, num_classes: 2, "
                                       "params: {filters_base: 8}}\n")
    other = ExperimentConfig.from_yaml(tmp_path / "other.yaml", ["model.params.strides=[2]"])
    # another backbone's section replaces the base's (its params would not fit); same name merges
    assert other.model.name == "attention_unet" and other.model.params == {"channels": [4, 8], "strides": [2]}
    assert other.model.num_classes == 4 and other.optim.name == "adam"
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="base cycle"):
        ExperimentConfig.from_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        ExperimentConfig.from_yaml(tmp_path / "c.yaml")


def test_source_paths_are_local(tmp_path):
    """A URI as a source path names the source and says sources are local (not 's3:/b/x: folder not found')."""
    from robustseg.config import SourceSpec

    for uri in ("s3://bucket/acdc", "S3://bucket/acdc", "gs://b/x", "http://example.org/x"):
        with pytest.raises(ConfigError, match=f"acdc_h5:{uri}: sources are local paths"):
            ExperimentConfig.from_dict({"data": {"sources": [{"name": "acdc_h5", "path": uri}]}})
    path = tmp_path / "acdc_h5"
    assert SourceSpec("acdc_h5", path.as_uri()).path == str(path)  # file:// is a local path
    assert SourceSpec("acdc_h5", "relative/dir:with:colons").path == "relative/dir:with:colons"
