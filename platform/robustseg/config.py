"""`ExperimentConfig`: the one typed configuration that travels from YAML to every worker.

YAML -> dataclasses (``from_dict``, unknown keys fail listing the valid ones) -> ``to_dict``
into Ray -> ``from_dict`` on each worker. Dotted overrides (``optim.lr=1e-3``) are applied to
the dict form, so they go through the same validation as the YAML.

Field documentation lives in ``field(metadata={"doc": ...})`` so ``robustseg config
--explain`` can print it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union
from urllib.parse import urlparse

import yaml

from robustseg.errors import ConfigError, UnknownNameError
from robustseg.registry import BACKBONES, PLANS, REGIMES, SECTION_CHECKS, SOURCES

T = TypeVar("T")
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def doc(default: Any = dataclasses.MISSING, text: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a documentation string kept in its metadata."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    if isinstance(default, (list, dict)):
        # Mutable defaults must be copied per instance.
        frozen = default
        return field(default_factory=lambda: type(frozen)(frozen), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# --------------------------------------------------------------------------- data
@dataclass
class SourceSpec:
    """One input dataset."""

    name: str = doc("", "Registered source name (`robustseg sources` lists them), e.g. acdc_h5.")
    path: str = doc("", "Folder or file the source reads.")
    options: Dict[str, Any] = doc(text="Source-specific options (e.g. spacing for acdc_h5).", factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("data.sources[].name: a source name is required")
        scheme = _URI_SCHEME.match(self.path)
        if scheme and scheme.group(1).lower() != "file":
            # Sources are read with local file APIs (h5py, SimpleITK, PIL); an s3:// path would be
            # taken for a relative folder "s3:/bucket/..." and reported as missing.
            raise ConfigError(f"data.sources[] {self.name}:{self.path}: sources are local paths (a file or folder "
                              f"on this machine), not {scheme.group(1)}:// URIs; copy the data here first "
                              "(only the prepared store, data.shards_uri / --out, may be s3://)")
        if scheme:  # file:///abs/path is the local path /abs/path
            self.path = urlparse(self.path).path


@dataclass
class CMRPlanConfig:
    """Cardiac MR preprocessing (source paper §2.5)."""

    target_spacing: Optional[List[float]] = doc(
        [1.25, 1.25], "In-plane target spacing (x, y) in mm; the slice axis is untouched. null: keep native."
    )
    clip_percentiles: List[float] = doc([0.5, 99.5], "Intensity clipping percentiles (low, high).")
    normalization: str = doc("zscore", "zscore or minmax, computed per volume after clipping.")
    crop_size: List[int] = doc([256, 256], "Fixed in-plane size (y, x) after crop/pad, centred on the heart.")
    centre: str = doc("label", "label: centre on the foreground centroid when a label exists, else image centre; image: always the image centre.")

    def __post_init__(self) -> None:
        _check_choice("data.cmr.normalization", self.normalization, ("zscore", "minmax"))
        _check_choice("data.cmr.centre", self.centre, ("label", "image"))
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"data.cmr.clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}")
        if len(self.crop_size) != 2 or min(self.crop_size) < 8:
            raise ConfigError(f"data.cmr.crop_size must be two sizes >= 8, got {self.crop_size}")
        if self.target_spacing is not None and (len(self.target_spacing) != 2 or min(self.target_spacing) <= 0):
            raise ConfigError(f"data.cmr.target_spacing must be two positive numbers or null, got {self.target_spacing}")


@dataclass
class CTPlanConfig:
    """Lung CT preprocessing (thesis §3.2)."""

    hu_window: List[float] = doc([-1250.0, 250.0], "HU window (low, high): the thesis's lung window.")
    lung_threshold_hu: float = doc(-320.0, "Voxels below this HU (inside the body) are lung candidates.")
    target_spacing: Optional[List[float]] = doc([1.0, 1.0], "Axial target spacing (x, y) in mm; z untouched.")
    crop_size: List[int] = doc([256, 256], "Fixed in-plane size (y, x) after crop/pad around the lungs.")
    mask_outside_lung: bool = doc(False, "Set voxels outside the (dilated) lung mask to the normalised minimum.")

    def __post_init__(self) -> None:
        if self.hu_window[0] >= self.hu_window[1]:
            raise ConfigError(f"data.ct.hu_window must be (low, high) with low < high, got {self.hu_window}")
        if len(self.crop_size) != 2 or min(self.crop_size) < 8:
            raise ConfigError(f"data.ct.crop_size must be two sizes >= 8, got {self.crop_size}")


@dataclass
class Slices2DPlanConfig:
    """2D slice folders (JPEG/PNG): size normalisation, original size recorded."""

    size: List[int] = doc([256, 256], "Output size (y, x); images are resized (bilinear) and masks (nearest).")
    normalization: str = doc("zscore", "zscore or minmax per slice.")

    def __post_init__(self) -> None:
        _check_choice("data.slices2d.normalization", self.normalization, ("zscore", "minmax"))
        if len(self.size) != 2 or min(self.size) < 8:
            raise ConfigError(f"data.slices2d.size must be two sizes >= 8, got {self.size}")


@dataclass
class StorageConfig:
    """Object-store access. Unset fields fall back to the AWS_* environment variables boto3 reads."""

    endpoint_url: Optional[str] = doc(None, "S3 endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), e.g. http://127.0.0.1:9000.")
    region: Optional[str] = doc(None, "S3 region (AWS_REGION / AWS_DEFAULT_REGION).")
    access_key: Optional[str] = doc(None, "Access key (AWS_ACCESS_KEY_ID).")
    secret_key: Optional[str] = doc(None, "Secret key (AWS_SECRET_ACCESS_KEY).")
    connect_timeout_s: float = doc(5.0, "Connection timeout: an unreachable store fails fast and names the URI.")


@dataclass
class DataConfig:
    """Where the data comes from, how it is preprocessed, sharded and split."""

    sources: List[SourceSpec] = doc(text="Input datasets.", factory=list)
    plan: str = doc("cmr", "Preprocessing plan: cmr, ct or slices2d.")
    shards_uri: str = doc("robustseg_work/shards", "Output URI: a local path, file:///abs or s3://bucket/prefix.")
    cmr: CMRPlanConfig = doc(text="Cardiac MR plan parameters.", factory=CMRPlanConfig)
    ct: CTPlanConfig = doc(text="Lung CT plan parameters.", factory=CTPlanConfig)
    slices2d: Slices2DPlanConfig = doc(text="2D slice plan parameters.", factory=Slices2DPlanConfig)
    storage: StorageConfig = doc(text="Object-store access.", factory=StorageConfig)
    folds: int = doc(5, "Number of subject-grouped folds.")
    split_seed: int = doc(0, "Seed of the fold assignment (deterministic).")
    stratify: Optional[str] = doc("auto", "Stratify folds by this case field (dataset, motion_level, ...); auto: dataset; null: none.")
    label_budget: Optional[int] = doc(None, "Keep labels of only this many subjects (small-sample experiments); the rest are marked unlabelled-for-training.")
    budget_split: str = doc("folds", "folds: the budget applies inside the usual K folds; holdout: validation (fold 0) "
                                     "holds exactly the labelled subjects outside the budget and fold 1 the budget "
                                     "plus every unlabelled case (label-budget curves: train on N, validate on the "
                                     "rest; needs folds: 2 and val_fold: 0).")
    slices_per_shard: int = doc(1024, "2D slices per Parquet shard.")
    store_volumes: bool = doc(False, "Also write whole-volume shards (one row per case, for 3D models); 2D slices always reassemble into volumes.")
    slice_dtype: str = doc("uint8", "Stored image encoding: uint8 (per-slice scale/offset, ~1/255 of the slice range), float16 or float32.")
    compression_level: int = doc(6, "zstd level of the Parquet shards.")
    sampling_weights: Dict[str, float] = doc(
        text="Pooled training: relative share of each dataset (manifest dataset name, e.g. acdc, mnms2, "
             "synthetic) in the training batches; unlisted datasets weigh 1. Empty: every slice equally likely.",
        factory=dict)
    val_fold: int = doc(0, "Fold held out for validation when training one model (cross-validation sweeps set it per run).")
    fg_fraction: float = doc(0.33, "Share of each training batch cropped around labelled foreground (nnU-Net's "
                                   "oversample_foreground_percent); the rest are uniform crops.")
    worker_cache_mb: int = doc(2048, "Ray Train: a worker whose share of the training slices decodes to at most this "
                                     "many MiB reads it once and samples it in memory as `robustseg train` does "
                                     "(foreground oversampling, source patches); a larger share streams from Ray Data "
                                     "on every pass (uniform crops). 0: always stream.")

    def __post_init__(self) -> None:
        _check_choice("data.slice_dtype", self.slice_dtype, ("uint8", "float16", "float32"))
        if self.folds < 2:
            raise ConfigError(f"data.folds must be >= 2, got {self.folds}")
        if self.slices_per_shard < 1:
            raise ConfigError("data.slices_per_shard must be >= 1")
        if self.label_budget is not None and self.label_budget < 1:
            raise ConfigError("data.label_budget must be >= 1 or null")
        _check_choice("data.budget_split", self.budget_split, ("folds", "holdout"))
        if self.budget_split == "holdout" and (self.label_budget is None or self.folds != 2 or self.val_fold != 0):
            raise ConfigError("data.budget_split=holdout needs data.label_budget, data.folds: 2 and data.val_fold: 0 "
                              f"(got label_budget={self.label_budget}, folds={self.folds}, val_fold={self.val_fold})")
        bad = {k: v for k, v in self.sampling_weights.items() if not (isinstance(v, (int, float)) and v >= 0)}
        if bad:
            raise ConfigError(f"data.sampling_weights must be non-negative numbers, got {bad}")
        if not 0 <= self.val_fold < self.folds:
            raise ConfigError(f"data.val_fold must be in [0, {self.folds}), got {self.val_fold}")
        if not (isinstance(self.fg_fraction, (int, float)) and 0 <= self.fg_fraction <= 1):
            raise ConfigError(f"data.fg_fraction must be a number in [0, 1], got {self.fg_fraction!r}")
        if isinstance(self.worker_cache_mb, bool) or not isinstance(self.worker_cache_mb, int) or self.worker_cache_mb < 0:
            raise ConfigError(f"data.worker_cache_mb must be an integer >= 0 (0: always stream), got {self.worker_cache_mb!r}")


# --------------------------------------------------------------------------- model & training
@dataclass
class ModelConfig:
    """Backbone choice; params are validated against the backbone's typed params dataclass."""

    name: str = doc("unet2d", "Registered backbone name.")
    params: Dict[str, Any] = doc(text="Backbone parameters (see the backbone's params dataclass).", factory=dict)
    in_channels: int = doc(1, "Input channels.")
    num_classes: int = doc(4, "Output classes including background.")
    slice_context: int = doc(0, "2D backbones: neighbouring slices on each side fed beside the slice as extra input "
                                "channels (2.5D; 1 = the slices above and below). Each slice of a cine stack is its "
                                "own breath-hold, so a neighbour is often less corrupted by motion. 0: plain 2D.")
    slice_context_dropout: float = doc(0.0, "Training with slice_context: share of samples whose neighbour channels "
                                            "repeat their own slice, so the network also learns to segment from one "
                                            "slice.")


@dataclass
class RegimeConfig:
    """Training regime (supervised, advchain, mean_teacher, genesis, ...)."""

    name: str = doc("supervised", "Registered regime name.")
    params: Dict[str, Any] = doc(text="Regime parameters.", factory=dict)
    init: str = doc("", "Start from these weights (pooled pre-training -> fine-tuning): a checkpoint, an ensemble "
                        "folder, models:/name@alias, or runs:/<run_id>. Empty: random initialisation.")
    init_member: str = doc("", "Ensemble member to take (default: the first with the same backbone).")
    init_optimizer: str = doc("fresh", "fresh: new optimiser and LR schedule; checkpoint: continue the source "
                                       "checkpoint's optimiser state.")
    init_lr_scale: float = doc(1.0, "Multiply optim.lr by this when starting from init (e.g. 0.1 for fine-tuning).")
    init_strict: bool = doc(True, "Every parameter must match; false loads those matching by name and shape.")
    init_flatten: str = doc("sum", "A 3D source (e.g. unet3d, Models Genesis cubes) into a 2D backbone: collapse each "
                                   "kernel's depth by sum (a depth-constant volume gives the 3D response) or centre "
                                   "(the kernel's middle slice).")
    finetune: str = doc("none", "Transfer-learning mode (lung CT thesis Ch. 3): decoder = freeze the first half of the "
                                "encoder and re-initialise the output layer; all = train everything and re-initialise "
                                "the last decoder block; scratch = random initialisation (regime.init must be empty), "
                                "for comparison; none = load init as is. U-Net backbones only.")

    def __post_init__(self) -> None:
        _check_choice("regime.init_flatten", self.init_flatten, ("sum", "centre"))
        _check_choice("regime.finetune", self.finetune, ("none", "decoder", "all", "scratch"))
        if self.finetune == "scratch" and self.init:
            raise ConfigError(f"regime.finetune=scratch trains from random weights, but regime.init={self.init!r}")
        if self.finetune in ("decoder", "all") and not self.init:
            raise ConfigError(f"regime.finetune={self.finetune} fine-tunes pre-trained weights: set regime.init")
        if self.finetune == "decoder" and self.init_optimizer == "checkpoint":
            raise ConfigError("regime.finetune=decoder trains a subset of the parameters: the source optimiser state "
                              "does not fit it; use regime.init_optimizer: fresh")
        if self.init_optimizer not in ("fresh", "checkpoint"):
            raise ConfigError(f"regime.init_optimizer must be 'fresh' or 'checkpoint', got {self.init_optimizer!r}")
        if not self.init_lr_scale > 0:
            raise ConfigError(f"regime.init_lr_scale must be > 0, got {self.init_lr_scale}")


#: ``optim.lr`` when a config leaves it out, per optimiser. AdamW is the default optimiser:
#: at the short budgets robustseg targets (a CPU, a few dozen scans) it converges in a fraction
#: of the samples nnU-Net's SGD-Nesterov needs (ACDC fold 0 at 24 x 40 x 16 samples, same net
#: and everything else equal: mean Dice 0.836 vs 0.808 clean, see
#: benchmarks/results/accuracy_budget_cpu.json, lever rows). nnU-Net's recipe for long
#: schedules stays one key away: ``optim.name: sgd_nesterov`` (lr 1e-2).
DEFAULT_LR = {"adamw": 2e-3, "adam": 2e-3, "sgd_nesterov": 1e-2, "sgd": 1e-2}


@dataclass
class OptimConfig:
    """Optimiser, schedule and loop length."""

    name: str = doc("adamw", "adamw (default), adam, sgd_nesterov (nnU-Net's) or sgd.")
    lr: Optional[float] = doc(None, "Initial learning rate; null: the optimiser's own default "
                                    "(adam/adamw 2e-3, sgd_nesterov/sgd 1e-2, see DEFAULT_LR).")
    weight_decay: float = doc(3e-5, "Weight decay.")
    momentum: float = doc(0.99, "Momentum (SGD variants).")
    schedule: str = doc("poly", "poly, step, cosine or constant.")
    poly_power: float = doc(0.9, "Exponent of the poly schedule.")
    step_every: int = doc(25, "Epochs between step-LR decays.")
    step_gamma: float = doc(0.8, "Step-LR decay factor.")
    epochs: int = doc(50, "Epochs.")
    iters_per_epoch: int = doc(250, "Iterations per epoch.")
    batch_size: int = doc(24, "Batch size per worker.")
    patience: Optional[int] = doc(None, "Early-stopping patience in epochs (null: off).")
    amp: str = doc("auto", "auto (bf16 on CUDA and on CPUs with AMX, see robustseg.engine.precision), bf16, or off.")
    compile: bool = doc(False, "torch.compile the model.")
    snapshot_every: int = doc(0, "Also keep the weights of every N-th epoch under snapshots/ (SVCCA analyses); 0: off.")
    seed: int = doc(0, "Training seed.")
    average_from: Optional[float] = doc(None, "Tail weight averaging (SWA/SWAD): from this fraction of the run on, "
                                              "keep the mean of the weights and validate, keep and serve that mean "
                                              "(e.g. 0.75: the last quarter); null: off.")
    average_every: int = doc(1, "Iterations between weights folded into the average.")
    average_hold_lr: bool = doc(False, "Hold the learning rate at its value where averaging starts (SWA proper: "
                                       "the average then spans a wide region instead of a decaying tail).")

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, tuple(DEFAULT_LR))
        if self.average_from is not None and not 0 <= self.average_from < 1:
            raise ConfigError(f"optim.average_from must be in [0, 1) or null, got {self.average_from}")
        if self.average_every < 1:
            raise ConfigError(f"optim.average_every must be >= 1, got {self.average_every}")
        _check_choice("optim.schedule", self.schedule, ("poly", "step", "cosine", "constant"))
        _check_choice("optim.amp", self.amp, ("auto", "bf16", "off"))
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.snapshot_every < 0:
            raise ConfigError(f"optim.snapshot_every must be >= 0, got {self.snapshot_every}")
        if self.epochs < 1 or self.iters_per_epoch < 1 or self.batch_size < 1:
            raise ConfigError("optim.epochs, optim.iters_per_epoch and optim.batch_size must be >= 1")

    @property
    def initial_lr(self) -> float:
        """``lr``, or the optimiser's default (`DEFAULT_LR`) when the config leaves it null.

        Resolved at use, not at load: a later ``optim.name=sgd_nesterov`` override must get
        SGD's rate, not the one AdamW's default put there.
        """
        return float(DEFAULT_LR[self.name] if self.lr is None else self.lr)


@dataclass
class LossConfig:
    """Dice + cross-entropy with deep-supervision weighting."""

    dice_weight: float = doc(1.0, "Weight of the soft Dice term.")
    ce_weight: float = doc(1.0, "Weight of the cross-entropy term.")
    deep_supervision: bool = doc(True, "Use the backbone's deep-supervision heads when it has them.")
    ds_decay: float = doc(0.5, "Weight of head i is ds_decay**i (normalised; the lowest-resolution head gets 0, as in nnU-Net).")
    include_background_dice: bool = doc(False, "Count background in the Dice term.")
    batch_dice: bool = doc(True, "Soft Dice over the whole batch (nnU-Net's 2D default, MONAI's batch=True) instead of "
                           "per sample: a structure absent from one patch then costs nothing by itself, so patches "
                           "without RV or heart do not pull its Dice to 0.")

    def __post_init__(self) -> None:
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            raise ConfigError("loss.dice_weight and loss.ce_weight must be >= 0 and not both 0")
        if not 0 < self.ds_decay <= 1:
            raise ConfigError(f"loss.ds_decay must be in (0, 1], got {self.ds_decay}")


@dataclass
class InferenceConfig:
    """Sliding-window inference, test-time augmentation and post-processing."""

    patch_size: Optional[List[int]] = doc(None, "Window size (in-plane for 2D); null: the shard slice size.")
    overlap: float = doc(0.5, "Fractional overlap of sliding windows.")
    gaussian: bool = doc(True, "Gaussian importance weighting of window centres.")
    tta: bool = doc(True, "Mirror test-time augmentation on all in-plane axes (and the slice axis for 3D).")
    postprocess: bool = doc(True, "Task post-processing (engine/postprocess.py); cardiac: heart column for LV/MYO, RV beside the heart, RV-without-LV/MYO removal.")
    batch_size: int = doc(32, "Slices/windows per forward pass at inference.")
    val_every: int = doc(1, "Validate every N epochs.")
    val_max_cases: Optional[int] = doc(None, "Validate on at most this many cases (quick runs); null: all of the fold.")

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"inference.overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1 or self.val_every < 1:
            raise ConfigError("inference.batch_size and inference.val_every must be >= 1")
        # 0 would silently validate nothing (no Dice, no best epoch): "all cases" is null.
        if self.val_max_cases is not None and self.val_max_cases < 1:
            raise ConfigError(f"inference.val_max_cases must be >= 1, got {self.val_max_cases}; "
                              "leave it out (null) to validate on every case of the fold")


@dataclass
class AugmentConfig:
    """GPU batch augmentation preset and overrides."""

    preset: str = doc("auto", "auto (cardiac for the cmr plan, else nnunet), nnunet, cardiac (nnunet + respiratory "
                      "motion p 0.5, levels 2-3), light (thesis) or none.")
    params: Dict[str, Any] = doc(text="Per-transform overrides of the preset.", factory=dict)
    mixup: float = doc(0.0, "Mixup probability per batch (0 disables).")
    mixup_alpha: float = doc(0.4, "Beta(alpha, alpha) parameter of the mixup ratio.")
    source_patch: bool = doc(True, "2D training: crop each patch with a margin that covers its rotation and zoom "
                                   "(nnU-Net's enlarged initial patch), so transformed patches show image, not "
                                   "padding, in their corners, and motion corrupts the wider field; false: crop "
                                   "the patch itself.")


@dataclass
class ScalingConfig:
    """Ray Train scaling."""

    num_workers: int = doc(1, "Train workers (DDP ranks).")
    use_gpu: bool = doc(False, "One (or gpus_per_worker) GPU per worker.")
    cpus_per_worker: float = doc(1.0, "Logical CPUs per worker.")
    gpus_per_worker: float = doc(1.0, "GPUs per worker when use_gpu (fractions allowed for small 2D models).")
    max_failures: int = doc(2, "Restarts from the last checkpoint after a worker dies.")
    resources_per_worker: Dict[str, float] = doc(text="Custom Ray resources each Train worker asks for, to place "
                                                      "folds on chosen nodes (e.g. {fold_worker: 0.01} for nodes "
                                                      "started with that resource).", factory=dict)


@dataclass
class TrackingConfig:
    """MLflow tracking, the local working folder and durable storage (`robustseg.durable`)."""

    workdir: str = doc("robustseg_work", "Working folder (made absolute): MLflow DB, artifacts, Ray storage.")
    tracking_uri: Optional[str] = doc(None, "MLflow tracking URI; default sqlite:///<workdir>/mlflow.db (or MLFLOW_TRACKING_URI).")
    experiment: str = doc("robustseg", "MLflow experiment name.")
    storage_uri: Optional[str] = doc(None, "Durable storage for everything that must outlive a node: Ray Train/Tune "
                                           "results, sweep bookkeeping (sweep.json, trials.json), ensemble folders, "
                                           "registered-model artifacts. A local folder or s3://bucket/prefix (endpoint "
                                           "and credentials from data.storage). Default: $ROBUSTSEG_STORAGE_URI, else "
                                           "<workdir>/ray_results.")

    def __post_init__(self) -> None:
        if self.storage_uri is not None and not str(self.storage_uri).strip():
            raise ConfigError("tracking.storage_uri: empty; leave it out (null) for $ROBUSTSEG_STORAGE_URI or "
                              "<workdir>/ray_results")


@dataclass
class ExperimentConfig:
    """Everything one experiment needs, from data to tracking."""

    name: str = doc("experiment", "Experiment name (run names, output folders).")
    data: DataConfig = doc(text="Data, preprocessing, shards, folds.", factory=DataConfig)
    model: ModelConfig = doc(text="Backbone.", factory=ModelConfig)
    regime: RegimeConfig = doc(text="Training regime.", factory=RegimeConfig)
    optim: OptimConfig = doc(text="Optimiser and schedule.", factory=OptimConfig)
    loss: LossConfig = doc(text="Loss.", factory=LossConfig)
    inference: InferenceConfig = doc(text="Inference, TTA, post-processing, validation.", factory=InferenceConfig)
    augment: AugmentConfig = doc(text="Augmentation.", factory=AugmentConfig)
    scaling: ScalingConfig = doc(text="Ray Train scaling.", factory=ScalingConfig)
    tracking: TrackingConfig = doc(text="MLflow tracking.", factory=TrackingConfig)

    def __post_init__(self) -> None:
        problems = check_components(self)
        if len(problems) > 1:
            problems = [f"{len(problems)} problems:", *problems]
        if problems:
            raise ConfigError("\n  ".join(problems))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (YAML/JSON/Ray safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExperimentConfig":
        """Build from a nested dict; unknown keys raise `ConfigError` listing valid keys."""
        return from_dict(cls, d, "")

    def to_yaml(self, path: Optional[Union[str, Path]] = None) -> str:
        """YAML text; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: Union[str, Path], overrides: Sequence[str] = ()) -> "ExperimentConfig":
        """Load a YAML file (with its ``base:`` files, see `read_yaml`) and apply dotted overrides."""
        p = Path(path)
        raw = read_yaml(p)
        try:
            return cls.from_dict(apply_overrides(raw, overrides))
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None

    def with_overrides(self, overrides: Sequence[str]) -> "ExperimentConfig":
        """A new config with dotted overrides applied."""
        return ExperimentConfig.from_dict(apply_overrides(self.to_dict(), overrides))


# --------------------------------------------------------------------------- components
def _named(key: str, registry: Any, name: str, params: Optional[Mapping[str, Any]], problems: List[str]) -> bool:
    """Check one registered name and, when its entry declares a params dataclass, its params."""
    try:
        registry.get(name)
    except UnknownNameError as e:
        problems.append(f"{key}.name: {e.args[0]}")
        return False
    params_cls = registry.meta(name).get("params")
    if params is not None and params_cls is not None:
        try:
            from_dict(params_cls, params, f"{key}.params ({name})")
        except ConfigError as e:
            problems.append(str(e))
    return True


def check_components(cfg: "ExperimentConfig") -> List[str]:
    """Every problem with the components a config names, one line each (empty: none).

    The single check behind loading: it runs whenever an `ExperimentConfig` is built (from
    YAML, a dict, overrides or a Ray worker's payload), so `config validate`, `train`, `tune`
    and the workers accept exactly the same configs. Checked against the registries (each
    lists the valid names): the backbone and the regime with their typed params, every data
    source and its options, the preprocessing plan, and the sections whose owners register a
    check (the augmentation preset and its per-transform params).
    """
    problems: List[str] = []
    dims = 2  # the augmentation's mirror axes are checked for 2D when the backbone is unknown
    if _named("model", BACKBONES, cfg.model.name, cfg.model.params, problems):
        dims = int(BACKBONES.meta(cfg.model.name).get("spatial_dims", dims))
    _named("regime", REGIMES, cfg.regime.name, cfg.regime.params, problems)
    problems += _slice_context_problems(cfg, dims)
    if cfg.data.plan not in PLANS:
        problems.append(f"data.plan: unknown preprocessing plan {cfg.data.plan!r}; valid: {', '.join(PLANS.names())}")
    for i, src in enumerate(cfg.data.sources):
        if src.name not in SOURCES:
            problems.append(f"data.sources[{i}].name: unknown source {src.name!r}; valid: {', '.join(SOURCES.names())}")
            continue
        allowed = SOURCES.meta(src.name).get("options")
        unknown = sorted(set(src.options) - set(allowed)) if allowed is not None else []
        if unknown:
            problems.append(f"data.sources[{i}] ({src.name}): unknown option(s) {unknown}; "
                            f"valid: {sorted(allowed) or 'none'}")
    for section in SECTION_CHECKS.names():
        try:
            SECTION_CHECKS.get(section)(cfg, dims)
        except ConfigError as e:
            problems.append(str(e))
    return problems


def _slice_context_problems(cfg: "ExperimentConfig", dims: int) -> List[str]:
    """``model.slice_context`` (an integer 0-4, 2D backbones, not image-restoring regimes) and its dropout."""
    k = cfg.model.slice_context
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 4:
        return [f"model.slice_context must be an integer in [0, 4] (neighbouring slices on each side), got {k!r}"]
    if k and cfg.model.in_channels != 1:
        return [f"model.slice_context={k} stacks neighbouring slices of a one-channel image; "
                f"model.in_channels is {cfg.model.in_channels}"]
    if k and dims != 2:
        return [f"model.slice_context={k} stacks neighbouring slices as channels of a 2D backbone; "
                f"{cfg.model.name!r} is {dims}D and sees the slices itself"]
    p = cfg.model.slice_context_dropout
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        return [f"model.slice_context_dropout must be a probability in [0, 1], got {p!r}"]
    if k and cfg.regime.name in REGIMES and REGIMES.meta(cfg.regime.name).get("data") == "images":
        return [f"model.slice_context={k}: regime {cfg.regime.name!r} restores its input image, one channel; "
                "train it with slice_context 0"]
    return []


# --------------------------------------------------------------------------- helpers
def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``over`` replaces ``base``.

    A mapping that names another component (its ``name`` differs, e.g. another backbone or
    regime) replaces the base's mapping whole: the base's params belong to its component.
    """
    if "name" in over and "name" in base and over["name"] != base["name"]:
        return dict(over)
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def read_yaml(path: Union[str, Path], _seen: Sequence[Path] = ()) -> Dict[str, Any]:
    """A config file as a dict, with the files its ``base:`` names merged under it.

    ``base`` is a path or a list of paths relative to the file; later bases override earlier
    ones and the file overrides them all (mappings merge key by key, except that a section
    naming another component, e.g. ``model: {name: attention_unet}``, replaces the base's
    section), so a shared preset
    (e.g. ``configs/presets/thesis_optim.yaml``) is written once.

    Raises:
        ConfigError: a missing or invalid file (named), or a ``base`` cycle.
    """
    p = Path(path)
    if p.resolve() in _seen:
        raise ConfigError(f"{p}: base cycle ({' -> '.join(str(s) for s in _seen)} -> {p})")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    bases = raw.pop("base", None) or []
    merged: Dict[str, Any] = {}
    for b in [bases] if isinstance(bases, str) else list(bases):
        merged = _merge(merged, read_yaml(p.parent / str(b), [*_seen, p.resolve()]))
    return _merge(merged, raw)


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Convert ``value`` to annotation ``tp`` (dataclasses, lists, optionals, scalars)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key or '<root>'} must be a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept any numeric literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _resolved_hints(cls: Type[Any]) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: Type[T], d: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys.

    Raises:
        ConfigError: unknown key (with the valid ones), wrong type, or a section's own
            ``__post_init__`` validation.
    """
    hints = _resolved_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        where = prefix or "config"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {names}")
    kwargs = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(hints[k], v, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML scalars).

    Raises:
        ConfigError: malformed override or a path through a non-mapping.
    """
    import copy

    out = copy.deepcopy(dict(d))
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.path=value")
        path, _, raw = ov.partition("=")
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {ov!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node: Any = out
        for k in keys[:-1]:
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {k!r} is not a section")
            node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {ov!r}: {keys[-2]!r} is not a section")
        node[keys[-1]] = value
    return out


def explain(cls: Type[Any] = ExperimentConfig, prefix: str = "") -> List[Tuple[str, str, str]]:
    """Rows ``(key, default, doc)`` for every leaf field, for `robustseg config --explain`."""
    rows: List[Tuple[str, str, str]] = []
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(explain(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((key, default, f.metadata.get("doc", "")))
    return rows


def absolute_workdir(cfg: ExperimentConfig) -> Path:
    """The working folder as an absolute path (Ray workers run elsewhere)."""
    return Path(os.path.expanduser(cfg.tracking.workdir)).resolve()
