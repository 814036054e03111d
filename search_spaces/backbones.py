"""One search space per backbone family.

Every space sets the backbone (``model/name``) and the optimiser its family is trained with,
then samples the learning rate and weight decay on a log scale around that family's published
recipe, the Dice/CE balance, the augmentation preset and mixup, and a few architecture
parameters that keep the input-size contract (a sampled value never changes the multiple the
patch must be divisible by beyond what common crops, 224 and 256, satisfy).

Recipes the ranges come from:

* ``unet2d``/``unet3d``: nnU-Net v2, SGD with Nesterov momentum 0.99, lr 1e-2, weight decay
  3e-5, poly schedule; searched lr 1e-3..3e-2.
* ``swin_unetr``: the source paper's AdamW, lr 4e-4, weight decay 5e-5; searched 1e-4..1e-3.
* ``swin_unet``: Swin-UNet's SGD, momentum 0.9, lr 0.01..0.05, weight decay 1e-4; searched
  0.01..0.1.
* ``attention_unet``/``unet``: the thesis's Adam-trained U-Nets; searched 1e-4..3e-3.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

from robustseg.registry import SEARCH_SPACES

Sample = Dict[str, Any]


# --------------------------------------------------------------------------- shared pieces
def sample_loss(trial: Any, *, deep_supervision: bool = False) -> Sample:
    """Dice/CE balance (CE weight against a fixed Dice weight of 1) and, for deep-supervised
    nets, the decay of the coarser heads' weights."""
    out: Sample = {
        "loss/dice_weight": 1.0,
        "loss/ce_weight": trial.suggest_float("loss/ce_weight", 0.25, 2.0, log=True),
    }
    if deep_supervision:
        out["loss/ds_decay"] = trial.suggest_float("loss/ds_decay", 0.3, 0.8)
    return out


def sample_augment(trial: Any, presets: Sequence[str] = ("nnunet", "light")) -> Sample:
    """Augmentation preset and mixup.

    Mixup's probability and alpha exist only when mixup is on (conditional parameters).
    """
    out: Sample = {"augment/preset": trial.suggest_categorical("augment/preset", list(presets))}
    out.update(sample_mixup(trial))
    return out


def sample_mixup(trial: Any) -> Sample:
    """Mixup on/off (a choice, not a config value), then its per-batch probability and
    Beta(alpha, alpha) when on."""
    if trial.suggest_categorical("choice/mixup", [False, True]):
        return {
            "augment/mixup": trial.suggest_float("augment/mixup", 0.1, 0.5),
            "augment/mixup_alpha": trial.suggest_float("augment/mixup_alpha", 0.1, 1.0, log=True),
        }
    return {"augment/mixup": 0.0}


def sample_sgd(trial: Any, *, name: str, lr: Sequence[float], weight_decay: Sequence[float],
               momentum: Sequence[float]) -> Sample:
    """An SGD-family optimiser with the poly schedule (nnU-Net's and Swin-UNet's choice)."""
    return {
        "optim/name": name,
        "optim/schedule": "poly",
        "optim/lr": trial.suggest_float("optim/lr", lr[0], lr[1], log=True),
        "optim/weight_decay": trial.suggest_float("optim/weight_decay", weight_decay[0], weight_decay[1], log=True),
        "optim/momentum": trial.suggest_categorical("optim/momentum", list(momentum)),
    }


def sample_adam(trial: Any, *, name: str, lr: Sequence[float], weight_decay: Sequence[float]) -> Sample:
    """Adam/AdamW with a poly or cosine schedule."""
    return {
        "optim/name": name,
        "optim/schedule": trial.suggest_categorical("optim/schedule", ["poly", "cosine"]),
        "optim/lr": trial.suggest_float("optim/lr", lr[0], lr[1], log=True),
        "optim/weight_decay": trial.suggest_float("optim/weight_decay", weight_decay[0], weight_decay[1], log=True),
    }


# --------------------------------------------------------------------------- spaces
def _dynunet(trial: Any, name: str) -> Sample:
    """What the nnU-Net-like 2D and 3D U-Nets share: SGD-Nesterov, deep-supervised loss,
    augmentation, width and residual blocks."""
    out: Sample = {"model/name": name}
    out.update(sample_sgd(trial, name="sgd_nesterov", lr=(1e-3, 3e-2), weight_decay=(1e-5, 1e-4),
                          momentum=(0.9, 0.95, 0.99)))
    out.update(sample_loss(trial, deep_supervision=True))
    out.update(sample_augment(trial))
    out["model/params/filters_base"] = trial.suggest_categorical("model/params/filters_base", [16, 32])
    out["model/params/res_block"] = trial.suggest_categorical("model/params/res_block", [False, True])
    return out


@SEARCH_SPACES.register("unet2d", backbone="unet2d")
def unet2d(trial: Any) -> Sample:
    """nnU-Net-like 2D U-Net, optionally with the deformable bottleneck (source paper §2.2)."""
    out = _dynunet(trial, "unet2d")
    deformable = trial.suggest_categorical("model/params/deformable", [False, True])
    out["model/params/deformable"] = deformable
    # DCNv2 modulation only means something with a deformable bottleneck.
    out["model/params/deformable_modulated"] = (
        trial.suggest_categorical("model/params/deformable_modulated", [False, True]) if deformable else False
    )
    return out


@SEARCH_SPACES.register("unet3d", backbone="unet3d")
def unet3d(trial: Any) -> Sample:
    """nnU-Net-like 3D U-Net."""
    return _dynunet(trial, "unet3d")


@SEARCH_SPACES.register("swin_unetr", backbone="swin_unetr")
def swin_unetr(trial: Any) -> Sample:
    """MONAI Swin-UNETR (2D): AdamW, embedding width, stochastic depth, v2 residual blocks.

    ``feature_size`` stays a multiple of 12 that the default heads (3, 6, 12, 24) divide at
    every stage; the window is left alone (MONAI clips it to small feature maps anyway).
    """
    out: Sample = {"model/name": "swin_unetr"}
    out.update(sample_adam(trial, name="adamw", lr=(1e-4, 1e-3), weight_decay=(1e-5, 1e-3)))
    out.update(sample_loss(trial))
    out.update(sample_augment(trial))
    out["model/params/feature_size"] = trial.suggest_categorical("model/params/feature_size", [24, 36, 48])
    out["model/params/dropout_path_rate"] = trial.suggest_float("model/params/dropout_path_rate", 0.0, 0.3)
    out["model/params/use_v2"] = trial.suggest_categorical("model/params/use_v2", [False, True])
    return out


@SEARCH_SPACES.register("swin_unet", backbone="swin_unet")
def swin_unet(trial: Any) -> Sample:
    """Pure-transformer Swin-UNet: SGD, token width, stochastic depth, MLP ratio.

    ``window_size`` is not searched: the input must be a multiple of ``4 * 2**3 * window``
    (224 for the default 7, 256 for 8), which the data's crop size fixes, so a sampled window
    would make half the trials fail on the patch check rather than on their merit.
    """
    out: Sample = {"model/name": "swin_unet"}
    out.update(sample_sgd(trial, name="sgd", lr=(1e-2, 1e-1), weight_decay=(1e-5, 1e-3), momentum=(0.9, 0.95)))
    out.update(sample_loss(trial))
    out.update(sample_augment(trial))
    # Both widths are divisible by the default heads (3, 6, 12, 24) at every stage.
    out["model/params/embed_dim"] = trial.suggest_categorical("model/params/embed_dim", [48, 96])
    out["model/params/drop_path_rate"] = trial.suggest_float("model/params/drop_path_rate", 0.0, 0.3)
    out["model/params/mlp_ratio"] = trial.suggest_categorical("model/params/mlp_ratio", [2.0, 4.0])
    return out


@SEARCH_SPACES.register("attention_unet", backbone="attention_unet")
def attention_unet(trial: Any) -> Sample:
    """Attention-gated U-Net (thesis): Adam, width and depth of the U, dropout.

    Widths double per level from ``base``; 4 or 5 levels need inputs divisible by 8 or 16.
    The two choices are sampled separately so TPE can learn each.
    """
    out: Sample = {"model/name": "attention_unet"}
    out.update(sample_adam(trial, name="adam", lr=(1e-4, 3e-3), weight_decay=(1e-6, 1e-4)))
    out.update(sample_loss(trial))
    out.update(sample_augment(trial))
    base = trial.suggest_categorical("choice/attention_unet_base", [16, 32, 64])
    levels = trial.suggest_categorical("choice/attention_unet_levels", [4, 5])
    out["model/params/channels"] = [base * 2**i for i in range(levels)]
    out["model/params/strides"] = [2] * (levels - 1)
    out["model/params/dropout"] = trial.suggest_float("model/params/dropout", 0.0, 0.3)
    return out


@SEARCH_SPACES.register("unet", backbone="unet")
def unet(trial: Any) -> Sample:
    """Plain 2D U-Net (thesis): Adam, base width, depth, bottom dropout, batch norm."""
    out: Sample = {"model/name": "unet"}
    out.update(sample_adam(trial, name="adam", lr=(1e-4, 3e-3), weight_decay=(1e-6, 1e-4)))
    out.update(sample_loss(trial))
    out.update(sample_augment(trial))
    out["model/params/base"] = trial.suggest_categorical("model/params/base", [16, 32, 64])
    # 2**depth must divide the input: depth <= 5 keeps 224 (= 7 * 32) and 256 valid.
    out["model/params/depth"] = trial.suggest_int("model/params/depth", 3, 5)
    out["model/params/dropout"] = trial.suggest_float("model/params/dropout", 0.0, 0.5)
    out["model/params/batch_norm"] = trial.suggest_categorical("model/params/batch_norm", [True, False])
    return out


BACKBONE_SPACES = ("unet2d", "unet3d", "swin_unetr", "swin_unet", "attention_unet", "unet")

__all__ = ["BACKBONE_SPACES", "sample_adam", "sample_augment", "sample_loss", "sample_mixup", "sample_sgd",
           *BACKBONE_SPACES]
