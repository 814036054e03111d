"""Accuracy at a fixed CPU budget: robustseg's default cardiac training vs a careful MONAI recipe.

Issue 16, item 1. Both sides get exactly the same budget and are scored by this file's own
Dice/HD95 code (numpy/scipy, independent of robustseg's metric code):

* **Data.** The shared ACDC set prepared by robustseg's ``acdc_h5`` source into 5
  subject-grouped folds (seed 0, as ``configs/acdc_unet2d.yaml``); the fold of every patient is
  read from that manifest. Train on folds 1-4 (64 patients, ED+ES), test on fold 0 (16
  patients x ED/ES = 32 volumes), whole volumes on the ORIGINAL h5 grid, canonical labels
  (1 LV, 2 MYO, 3 RV; the h5 files store ACDC's 1 RV / 3 LV).
* **Budget.** A DynUNet-like 2D net, filters 16 -> 256, deep supervision, the kernels/strides
  nnU-Net's rule gives a 128x128 patch; E epochs x I iterations x batch B of 128x128 patches
  sampled from full-field slices (default 24 x 40 x 16); SGD-Nesterov (1e-2, momentum 0.99,
  wd 3e-5) with poly decay; Dice + CE. Inference: 128x128 sliding window, overlap 0.5,
  Gaussian weighting, 4 mirror TTA copies.
* **robustseg** = ``robustseg train --config configs/acdc_budget.yaml`` (the default behaviour,
  only the budget keys set), run in-process through `train_from_config`, then the checkpoint's
  own predictor (`load_predictor` + `predict_case`, default TTA and post-processing) on each
  original-grid volume.
* **MONAI** = what a careful MONAI user writes: dictionary transforms at nnU-Net-like
  probabilities, ``monai.data.DataLoader`` with 2 workers, ``DiceCELoss`` wrapped in
  ``DeepSupervisionLoss``, SGD + ``PolynomialLR``; ``sliding_window_inference`` + 4 flips,
  argmax, ``KeepLargestConnectedComponent`` per class in 3D. It borrows nothing from robustseg
  except the fold list and the motion simulator.
* **Motion.** Each test volume is also corrupted by robustseg's k-space respiratory motion
  simulator at levels 1-3 on its original grid (`robustseg.analysis.robustness.corrupt_case`,
  seed 0: the exact images ``robustseg robustness`` scores), and both models see the same
  corrupted images; the label stays the motion-free one.

    python benchmarks/accuracy_budget.py                       # full budget, both sides (~1 h on 2 idle cores)
    python benchmarks/accuracy_budget.py --only monai          # one side, merged into the existing JSON
    python benchmarks/accuracy_budget.py --quick --out /tmp/ab.json   # 2 x 5 x 4, 1 test patient: a smoke run

Writes ``benchmarks/results/accuracy_budget_cpu.json`` (or ``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

CONFIG = REPO / "configs" / "acdc_budget.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "accuracy_budget_cpu.json"
WORK = REPO / "robustseg_work" / "accuracy_budget"
STRUCTURES = {1: "LV", 2: "MYO", 3: "RV"}  # canonical labels
ACDC_TO_CANONICAL = np.array([0, 3, 2, 1], dtype=np.uint8)  # h5 stores 1 RV, 2 MYO, 3 LV
LEVELS = (0, 1, 2, 3)
MOTION_SEED = 0
PATCH = (128, 128)
FILTERS = (16, 256)
OVERLAP = 0.5
VAL_FOLD = 0
try:  # MONAI's KeepLargestConnectedComponent needs scikit-image (monai[skimage]); see largest_components_3d
    import skimage.measure  # noqa: F401

    HAVE_SKIMAGE = True
except ImportError:
    HAVE_SKIMAGE = False


# --------------------------------------------------------------------------- setup and data


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line: budget, which side, where to write."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, help="epochs E (default 24; --quick 2)")
    p.add_argument("--iters", type=int, help="iterations per epoch I (default 40; --quick 5)")
    p.add_argument("--batch", type=int, help="batch size B (default 16; --quick 4)")
    p.add_argument("--test-patients", type=int,
                   help="score only the first N fold-0 patients (default all 16; --quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="2 x 5 x 4 and 1 test patient (2 volumes): checks the script end to end")
    p.add_argument("--only", choices=("robustseg", "monai"), help="run one side and merge it into an existing --out")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"result JSON (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process (default 2 = the cores)")
    p.add_argument("--workers", type=int, default=2, help="MONAI DataLoader workers (default 2)")
    p.add_argument("--rs-predict", choices=("default", "full-fov"), default="default",
                   help="robustseg predict mode: default (plain `robustseg predict`: the checkpoint picks the field; "
                        "a patch-trained model locates the heart and segments a box around it) or full-fov "
                        "(`predict --full-fov`: one sliding window over the whole field, what the issue measured)")
    p.add_argument("--seed", type=int, default=0, help="training seed of both sides")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="robustseg config override for a lever row (e.g. augment.preset=nnunet); repeatable. "
                        "Rows with overrides are not the default behaviour: the JSON records them under settings")
    p.add_argument("--tag", default="", help="suffix of the checkpoint folder (keeps lever rows apart)")
    p.add_argument("--rescore", action="store_true",
                   help="robustseg side: do not train; score the checkpoint this budget and --tag already trained "
                        "(last.pt) with the current predict code (timings of training come from its history.json)")
    args = p.parse_args(argv)
    quick = (2, 5, 4, 1) if args.quick else (24, 40, 16, None)
    args.epochs = args.epochs or quick[0]
    args.iters = args.iters or quick[1]
    args.batch = args.batch or quick[2]
    args.test_patients = args.test_patients or quick[3]
    args.out = args.out.resolve()
    return args


def machine(threads: int) -> str:
    """CPU model and cores (from /proc/cpuinfo), torch/monai versions, threads used."""
    import monai

    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
    except OSError:
        names = []
    cpu = names[0] if names else platform.processor() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores ({len(names)} logical in /proc/cpuinfo); torch {torch.__version__} "
            f"({threads} threads), monai {monai.__version__}, python {platform.python_version()}")


def read_h5(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Image (Z, H, W) float32 in [0, 1] and label in canonical order (1 LV, 2 MYO, 3 RV)."""
    with h5py.File(path, "r") as f:
        image = np.asarray(f["image"], dtype=np.float32)
        label = ACDC_TO_CANONICAL[np.asarray(f["label"], dtype=np.uint8)]
    return image, label


def fold_split(cfg: Any, test_patients: Optional[int]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Training and test case entries from robustseg's manifest (prepared first if missing).

    The only place the folds come from: both sides train on the same 64 patients and are
    tested on the same fold-0 volumes. Entries carry ``case_id``, ``subject_id``, ``phase``
    and ``source_path`` (the h5 file, relative to the repository root).
    """
    from robustseg.engine.train import ensure_prepared

    manifest = ensure_prepared(cfg)
    train = [c for c in manifest.cases if c["fold"] != VAL_FOLD and c["has_label"]]
    test = [c for c in manifest.cases if c["fold"] == VAL_FOLD and c["has_label"]]
    if test_patients:
        keep = sorted({c["subject_id"] for c in test})[:test_patients]
        test = [c for c in test if c["subject_id"] in keep]
    return train, test


def motion_images(entries: Sequence[Dict[str, Any]], level: int) -> List[Tuple[Dict[str, Any], Any]]:
    """(entry, robustseg Case) per test volume, the image corrupted at ``level``.

    The Case only carries the benchmark's own h5 read into the motion simulator; its id
    seeds the corruption, so these are the images `robustseg robustness` scores.
    """
    from robustseg.analysis.robustness import corrupt_case
    from robustseg.data.cases import Case

    out = []
    for e in entries:
        image, label = read_h5(Path(e["source_path"]))
        case = Case(case_id=e["case_id"], subject_id=e["subject_id"], image=image, label=label, spacing_known=False,
                    modality="MR", task="cardiac", phase=e.get("phase", ""), dataset="acdc",
                    source_path=e["source_path"])
        out.append((e, corrupt_case(case, level, MOTION_SEED)))
    return out


# --------------------------------------------------------------------------- metrics (own code)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (nothing to score)."""
    denom = int(pred.sum()) + int(gt.sum())
    return float("nan") if denom == 0 else 2.0 * float(np.logical_and(pred, gt).sum()) / denom


def hd95_px(pred: np.ndarray, gt: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance in voxels (3D, unit spacing: ACDC h5 has none).

    MedPy's definition: surface voxels are those one face-connected erosion removes, and the
    distances of both directions are pooled. Both empty: NaN; one empty: the volume's
    diagonal, a finite worst case (a missed structure must not vanish from the mean).
    """
    if not pred.any() and not gt.any():
        return float("nan")
    if not pred.any() or not gt.any():
        return float(np.linalg.norm(gt.shape))
    idx = np.nonzero(pred | gt)  # crop to the joint box (+1 margin): same distances, less work
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
    p, g = pred[box], gt[box]
    face = ndimage.generate_binary_structure(3, 1)
    sp = p & ~ndimage.binary_erosion(p, face, border_value=0)
    sg = g & ~ndimage.binary_erosion(g, face, border_value=0)
    d = np.concatenate([ndimage.distance_transform_edt(~sg)[sp], ndimage.distance_transform_edt(~sp)[sg]])
    return float(np.percentile(d, 95))


def score_volume(pred: np.ndarray, gt: np.ndarray) -> Dict[str, Dict[str, float]]:
    """Dice and HD95 per structure of one volume."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} is not on the label's grid {gt.shape}")
    return {"dice": {n: dice(pred == c, gt == c) for c, n in STRUCTURES.items()},
            "hd95": {n: hd95_px(pred == c, gt == c) for c, n in STRUCTURES.items()}}


def evaluate(segment: Callable[[Any], np.ndarray], entries: Sequence[Dict[str, Any]], name: str,
             per_case: Optional[Path] = None) -> Dict[str, Any]:
    """Score ``segment`` (Case -> label map on its grid) on every test volume at every level.

    Returns the result keys of one side except the training ones; inference seconds are the
    median over the clean (level 0) volumes, timed from the original-grid image to the final
    label map (preprocessing, windows, TTA, post-processing). With ``per_case``, every
    volume's scores at every level are also written there (JSON), to find the cases a lever
    moved.
    """
    dice_by, hd_by, seconds, cases = {}, {}, [], {}
    for level in LEVELS:
        rows = []
        for entry, case in motion_images(entries, level):
            t0 = time.perf_counter()
            pred = segment(case)
            if level == 0:
                seconds.append(time.perf_counter() - t0)
            rows.append(score_volume(np.asarray(pred), case.label))
            cases.setdefault(entry["case_id"], {})[f"l{level}"] = rows[-1]
        dice_by[f"l{level}"] = {n: float(np.nanmean([r["dice"][n] for r in rows])) for n in STRUCTURES.values()}
        hd_by[f"l{level}"] = {n: float(np.nanmean([r["hd95"][n] for r in rows])) for n in STRUCTURES.values()}
        mean = float(np.mean(list(dice_by[f"l{level}"].values())))
        print(f"  {name} level {level}: Dice {mean:.3f} "
              + " ".join(f"{n} {v:.3f}" for n, v in dice_by[f"l{level}"].items()), flush=True)
    if per_case is not None:
        per_case.parent.mkdir(parents=True, exist_ok=True)
        per_case.write_text(json.dumps(cases, indent=1) + "\n")
    return {"dice_mean_l0": float(np.mean(list(dice_by["l0"].values()))),
            "dice_mean_l3": float(np.mean(list(dice_by["l3"].values()))),
            "dice": dice_by, "hd95_px": hd_by, "infer_s_per_volume": float(np.median(seconds))}


# --------------------------------------------------------------------------- robustseg side


def robustseg_config(args: argparse.Namespace) -> Any:
    """configs/acdc_budget.yaml with the run's budget (its only non-default keys are the budget's)."""
    from robustseg.config import ExperimentConfig

    over = [f"optim.epochs={args.epochs}", f"optim.iters_per_epoch={args.iters}", f"optim.batch_size={args.batch}",
            f"optim.seed={args.seed}",
            # Validate only after the last epoch: fold 0 is the test fold and must not pick the checkpoint.
            f"inference.val_every={args.epochs}"]
    if args.quick:
        over.append("inference.val_max_cases=2")  # the smoke run's end-of-training validation: 2 volumes
    return ExperimentConfig.from_yaml(CONFIG, over + list(args.overrides))


def run_robustseg(args: argparse.Namespace, cfg: Any, test: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Train with `train_from_config` (what `robustseg train` runs), predict with the checkpoint's predictor."""
    from robustseg.augment.presets import resolve_preset
    from robustseg.engine.precision import autocast_dtype, inference_amp
    from robustseg.engine.predict import load_predictor, predict_case
    from robustseg.engine.train import train_from_config

    out_dir = WORK / run_tag(args) / "robustseg"
    print(f"robustseg: {'rescoring' if args.rescore else 'training'} {cfg.model.name} {cfg.model.params} on folds != {VAL_FOLD} -> {out_dir}", flush=True)

    def report(epoch: int, m: Dict[str, float], _: Path) -> None:
        val = f"  val Dice {m['val_dice']:.3f}" if "val_dice" in m else ""
        print(f"  robustseg epoch {epoch:3d}/{args.epochs}  loss {m.get('loss', float('nan')):.4f}  lr {m['lr']:.2e}  "
              f"{m['slices_per_s']:.1f} slices/s  {m['epoch_seconds']:.1f} s{val}", flush=True)

    if args.rescore:
        history = json.loads((out_dir / "history.json").read_text())
        history = history if isinstance(history, list) else history["history"]
        last = out_dir / "last.pt"
        loop_s = sum(h["epoch_seconds"] for h in history)
        train_s = loop_s  # the training loop only: the original wall time is in that run's output
        print(f"robustseg: rescoring {last} (trained earlier; loop {loop_s:.0f} s)", flush=True)
    else:
        t0 = time.perf_counter()
        result = train_from_config(cfg, out_dir=out_dir, device=torch.device("cpu"), resume=False, callbacks=[report])
        train_s = time.perf_counter() - t0
        loop_s = sum(h["epoch_seconds"] for h in result.history)
        last = result.last_checkpoint
    # last.pt: the final weights, as on the MONAI side (with val_every = epochs best.pt is the same model).
    pred = load_predictor(last, torch.device("cpu"))
    full_fov = args.rs_predict == "full-fov"
    print(f"robustseg: trained in {train_s:.0f} s; predicting with {last.name} "
          f"({'--full-fov' if full_fov else 'default: trained on ' + pred.trained_on}, TTA {pred.cfg.inference.tta}, "
          f"post-processing {pred.cfg.inference.postprocess}, bf16 {inference_amp(pred.device)})", flush=True)
    options = {"full_fov": True} if full_fov else {}  # default: exactly what plain `robustseg predict` does

    def segment(case: Any) -> np.ndarray:
        return predict_case(pred, case, **options)

    res = evaluate(segment, test, "robustseg", per_case=out_dir / "per_case.json")
    amp = autocast_dtype(cfg.optim.amp, torch.device("cpu"))
    return {**res, "train_s": train_s, "train_slices_per_s": args.epochs * args.iters * args.batch / loop_s,
            "settings": {"augment_preset": resolve_preset(cfg.augment.preset, cfg.data.plan),
                         "train_precision": "bf16 autocast" if amp else "float32",
                         "predict": args.rs_predict, "trained_on": pred.trained_on, "overrides": list(args.overrides),
                         "postprocess": pred.cfg.inference.postprocess, "rescored": bool(args.rescore)}}


# --------------------------------------------------------------------------- MONAI side


def nnunet_2d_topology(patch: Sequence[int], min_size: int = 4, max_stages: int = 8) -> Tuple[list, list]:
    """Kernels and strides by nnU-Net's 2D rule: halve while the map stays >= min_size, 3x3 kernels."""
    size, strides = list(patch), [[1, 1]]
    while len(strides) < max_stages and all(s >= 2 * min_size for s in size):
        size = [s // 2 for s in size]
        strides.append([2, 2])
    return [[3, 3]] * len(strides), strides


def monai_net() -> torch.nn.Module:
    """DynUNet 16 -> 256 filters, instance norm, LeakyReLU 0.01, 3 deep-supervision heads."""
    from monai.networks.nets import DynUNet

    kernels, strides = nnunet_2d_topology(PATCH)
    filters = [min(FILTERS[0] * 2 ** i, FILTERS[1]) for i in range(len(strides))]
    return DynUNet(spatial_dims=2, in_channels=1, out_channels=4, kernel_size=kernels, strides=strides,
                   upsample_kernel_size=strides[1:], filters=filters, norm_name=("INSTANCE", {"affine": True}),
                   act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
                   deep_supervision=True, deep_supr_num=3)


def monai_train_transforms() -> Any:
    """nnU-Net-like 2D augmentation as MONAI dictionary transforms.

    The crop is taken larger (192) and RandAffined resamples the centre 128x128 out of it,
    so rotated/scaled patches have real image in their corners (nnU-Net does the same);
    when the affine is not drawn RandAffined reduces to that centre crop.
    """
    from monai.transforms import (Compose, EnsureTyped, RandAdjustContrastd, RandAffined, RandCropByPosNegLabeld,
                                  RandFlipd, RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd,
                                  RandSimulateLowResolutiond, SpatialPadd)

    keys = ["image", "label"]
    big = (192, 192)
    return Compose([
        SpatialPadd(keys, spatial_size=big),
        # pos=1, neg=2: a third of the patches centred on foreground (nnU-Net's oversampling).
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=big, pos=1, neg=2, num_samples=1),
        RandAffined(keys, prob=0.2, spatial_size=PATCH, rotate_range=(math.pi,), scale_range=(0.3, 0.3),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandGaussianNoised("image", prob=0.1, std=0.1),
        RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0)),
        RandScaleIntensityd("image", prob=0.15, factors=0.25),
        RandAdjustContrastd("image", prob=0.15, gamma=(0.7, 1.5)),
        RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0), upsample_mode="bilinear"),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
    ])


def monai_slices(entries: Sequence[Dict[str, Any]]) -> List[Dict[str, np.ndarray]]:
    """One dict per training slice: image z-scored over its volume (NormalizeIntensity), label."""
    from monai.transforms import NormalizeIntensity

    norm = NormalizeIntensity()
    items = []
    for e in entries:
        image, label = read_h5(Path(e["source_path"]))
        image = np.asarray(norm(image))
        items += [{"image": image[z][None], "label": label[z][None]} for z in range(image.shape[0])]
    return items


def run_monai(args: argparse.Namespace, train: Sequence[Dict[str, Any]],
              test: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Train the MONAI recipe for the budget, then score it like the robustseg side."""
    t0 = time.perf_counter()
    model, loop_s = train_monai(args, monai_slices(train))
    train_s = time.perf_counter() - t0
    out = WORK / run_tag(args) / "monai" / "model.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)  # for re-scoring or re-timing without retraining
    print(f"monai: trained in {train_s:.0f} s -> {out}", flush=True)
    res = evaluate(lambda case: predict_monai(model, case.image), test, "monai", per_case=out.parent / "per_case.json")
    return {**res, "train_s": train_s, "train_slices_per_s": args.epochs * args.iters * args.batch / loop_s}


def train_monai(args: argparse.Namespace, slices: List[Dict[str, np.ndarray]]) -> Tuple[torch.nn.Module, float]:
    """The training loop; returns the model and the seconds spent in the loop."""
    from monai.data import DataLoader, Dataset
    from monai.losses import DeepSupervisionLoss, DiceCELoss
    from monai.utils import set_determinism

    set_determinism(seed=args.seed)
    # Slices without foreground cannot give a positive crop; MONAI warns per sample, in every worker.
    warnings.filterwarnings("ignore", message=".*unable to generate class balanced samples.*")
    steps = args.epochs * args.iters
    sampler = torch.utils.data.RandomSampler(range(len(slices)), replacement=True, num_samples=steps * args.batch)
    # monai.data.DataLoader: a torch DataLoader that also reseeds MONAI's random transforms per worker.
    loader = DataLoader(Dataset(slices, monai_train_transforms()), batch_size=args.batch, sampler=sampler,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    model = monai_net()
    print(f"monai: training DynUNet ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) on "
          f"{len(slices)} slices, {args.workers} loader workers", flush=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, weight_decay=3e-5, nesterov=True)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=steps, power=0.9)
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True, batch=True), weight_mode="exp")
    model.train()
    t_loop, t_epoch, running = time.perf_counter(), time.perf_counter(), 0.0
    for step, batch in enumerate(loader, start=1):
        # DynUNet in train mode stacks [output, head1, ...] (all upsampled) on dim 1.
        loss = loss_fn(list(torch.unbind(model(batch["image"]), dim=1)), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)  # nnU-Net's clip
        opt.step()
        sched.step()
        running += loss.item()
        if step % args.iters == 0:
            sec = time.perf_counter() - t_epoch
            print(f"  monai epoch {step // args.iters:3d}/{args.epochs}  loss {running / args.iters:.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {args.iters * args.batch / sec:.1f} slices/s  {sec:.1f} s",
                  flush=True)
            t_epoch, running = time.perf_counter(), 0.0
    return model.eval(), time.perf_counter() - t_loop


def predict_monai(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Original-grid volume -> label map: z-score, sliding window x 4 flips, argmax, 3D largest components."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import KeepLargestConnectedComponent, NormalizeIntensity

    x = torch.as_tensor(np.asarray(NormalizeIntensity()(image)), dtype=torch.float32)[:, None]  # slices as a batch
    probs = torch.zeros((x.shape[0], 4) + tuple(x.shape[2:]))
    with torch.inference_mode():
        for dims in ((), (2,), (3,), (2, 3)):
            xi = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(xi, roi_size=PATCH, sw_batch_size=16, predictor=model,
                                              overlap=OVERLAP, mode="gaussian")
            p = torch.softmax(logits, dim=1)
            probs += torch.flip(p, dims) if dims else p
    labels = probs.argmax(1)[None]  # (1, Z, H, W): one channel, three spatial dims -> 3D components
    if HAVE_SKIMAGE:
        keep = KeepLargestConnectedComponent(applied_labels=list(STRUCTURES), independent=True)
        return np.asarray(keep(labels))[0].astype(np.uint8)
    return largest_components_3d(labels[0].numpy().astype(np.uint8))


def largest_components_3d(labels: np.ndarray) -> np.ndarray:
    """What KeepLargestConnectedComponent(applied_labels=[1, 2, 3], independent=True) does, in scipy.

    MONAI's transform needs scikit-image, which robustseg does not install: the same rule
    (per class, full 26-connectivity in 3D, removed voxels become background) in scipy.
    """
    out = labels.copy()
    for c in STRUCTURES:
        comp, n = ndimage.label(labels == c, structure=np.ones((3, 3, 3), dtype=bool))
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[(comp > 0) & (comp != int(np.argmax(sizes)))] = 0
    return out


# --------------------------------------------------------------------------- output


def run_tag(args: argparse.Namespace) -> str:
    tag = f"{'quick-' if args.quick else ''}e{args.epochs}_i{args.iters}_b{args.batch}"
    # A seed replicate must not overwrite seed 0's checkpoints (seed 0 keeps its old folder names).
    tag += f"_s{args.seed}" if args.seed else ""
    return f"{tag}-{args.tag}" if args.tag else tag


def budget(args: argparse.Namespace, train: Sequence[Dict[str, Any]], test: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """What both sides got (stored in the JSON; a merge with --only requires it unchanged)."""
    kernels, strides = nnunet_2d_topology(PATCH)
    return {
        "data": "shared ACDC h5, robustseg acdc_h5 source, 5 subject-grouped folds, split seed 0",
        "train": f"folds 1-4: {len({c['subject_id'] for c in train})} patients, {len(train)} volumes (ED+ES)",
        "test": f"fold 0: {len({c['subject_id'] for c in test})} patients, {len(test)} volumes, original h5 grid",
        "epochs": args.epochs, "iters_per_epoch": args.iters, "batch_size": args.batch,
        "samples": args.epochs * args.iters * args.batch, "patch": list(PATCH),
        "net": {"type": "DynUNet 2D, instance norm, LeakyReLU 0.01",
                "filters": [min(FILTERS[0] * 2 ** i, FILTERS[1]) for i in range(len(strides))],
                "kernels": " ".join("x".join(map(str, k)) for k in kernels),
                "strides": " ".join("x".join(map(str, s)) for s in strides), "deep_supervision_heads": 3,
                "parameters": sum(p.numel() for p in monai_net().parameters())},
        "optim": "SGD-Nesterov lr 1e-2 momentum 0.99 wd 3e-5, poly 0.9 per iteration, grad clip 12",
        "loss": "Dice + CE with deep supervision",
        "inference": f"sliding window {PATCH[0]}x{PATCH[1]}, overlap {OVERLAP}, gaussian, 4 mirror TTA",
        "monai_postprocess": "KeepLargestConnectedComponent per class, 3D" if HAVE_SKIMAGE else
                             "largest 3D component per class (scipy; KeepLargestConnectedComponent needs scikit-image)",
        "motion": {"levels": list(LEVELS), "seed": MOTION_SEED, "simulator": "robustseg.data.motion via "
                   "robustseg.analysis.robustness.corrupt_case, original grid, phase axis Y"},
        "metrics": "own numpy/scipy code; Dice per structure (canonical LV/MYO/RV), HD95 3D in voxels "
                   "(no spacing in the h5), mean over volumes; a missed structure's HD95 = volume diagonal",
        "timing": "train_s: wall of the whole training call (data loading, loop, robustseg's end-of-training "
                  "validation); train_slices_per_s: samples / training-loop seconds; infer_s_per_volume: "
                  "median over the clean test volumes, image in -> label map out",
        "threads": f"torch.set_num_threads({args.threads}) in the main process; MONAI DataLoader with "
                   f"{args.workers} workers (1 torch thread each)",
        "seed": args.seed, "quick": bool(args.quick),
    }


def merge_and_write(path: Path, doc: Dict[str, Any], sides: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Write ``doc`` + the sides run now, keeping the other side of an existing file with the same budget.

    Other top-level keys of the existing file (the ``levers`` rows, ``notes``) are kept.
    """
    extra: Dict[str, Any] = {}
    if path.is_file():
        old = json.loads(path.read_text())
        extra = {k: v for k, v in old.items() if k not in ("machine", "budget", "robustseg", "monai")}
        if old.get("budget") == doc["budget"]:
            for side in ("robustseg", "monai"):
                if side not in sides and side in old:
                    sides[side] = old[side]
        elif any(s not in sides for s in ("robustseg", "monai")) and any(s in old for s in ("robustseg", "monai")):
            print(f"note: {path} was made with another budget; its results are not merged", flush=True)
    out = {"machine": doc["machine"], "budget": doc["budget"],
           **{s: sides[s] for s in ("robustseg", "monai") if s in sides}, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def print_table(doc: Dict[str, Any]) -> None:
    """Dice per level, clean per-structure Dice and HD95, and the timings of each side."""
    print(f"\n{doc['machine']}")
    b = doc["budget"]
    print(f"budget: {b['epochs']} x {b['iters_per_epoch']} x {b['batch_size']} of {b['patch']} patches; {b['test']}")
    head = (f"{'':10} {'Dice l0':>7} {'LV':>6} {'MYO':>6} {'RV':>6} {'l1':>6} {'l2':>6} {'l3':>6} {'drop':>6} "
            f"{'HD95 LV':>8} {'MYO':>6} {'RV':>6} {'train s':>8} {'sl/s':>6} {'s/vol':>6}")
    print(head)
    for side in ("robustseg", "monai"):
        r = doc.get(side)
        if not r:
            continue
        means = [float(np.mean(list(r["dice"][f"l{k}"].values()))) for k in LEVELS]
        d0, h0 = r["dice"]["l0"], r["hd95_px"]["l0"]
        print(f"{side:10} {means[0]:7.3f} {d0['LV']:6.3f} {d0['MYO']:6.3f} {d0['RV']:6.3f} {means[1]:6.3f} "
              f"{means[2]:6.3f} {means[3]:6.3f} {means[0] - means[3]:6.3f} {h0['LV']:8.1f} {h0['MYO']:6.1f} "
              f"{h0['RV']:6.1f} {r['train_s']:8.0f} {r['train_slices_per_s']:6.1f} {r['infer_s_per_volume']:6.2f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    # The config's relative paths (../shared/data/acdc_h5, robustseg_work/...) are the repository root's.
    os.chdir(REPO)
    torch.set_num_threads(args.threads)
    cfg = robustseg_config(args)
    train, test = fold_split(cfg, args.test_patients)
    doc = {"machine": machine(args.threads), "budget": budget(args, train, test)}
    print(f"{doc['budget']['train']}; {doc['budget']['test']}; "
          f"{args.epochs} x {args.iters} x {args.batch}", flush=True)
    sides: Dict[str, Dict[str, Any]] = {}
    # Each side names its machine: an --only run merges into results made elsewhere, and
    # timings compare only within one machine.
    if args.only in (None, "robustseg"):
        sides["robustseg"] = {**run_robustseg(args, cfg, test), "machine": doc["machine"]}
        merge_and_write(args.out, doc, dict(sides))  # a later crash of the other side keeps this one
    if args.only in (None, "monai"):
        sides["monai"] = {**run_monai(args, train, test), "machine": doc["machine"]}
    out = merge_and_write(args.out, doc, sides)
    print_table(out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
