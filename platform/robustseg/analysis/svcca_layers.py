"""Which layers SVCCA compares: a backbone's top-level blocks, found from one forward pass.

`default_layers` finds the blocks in forward order (encoder stages, bottleneck, decoder
stages, output) without knowing the backbone (see its notes); `feature_layout` tells a
channel-first map from a channel-last one (Swin stages) or a vector; `check_layers` names
the valid choices when a requested module does not exist.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from robustseg.errors import ConfigError

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


# --------------------------------------------------------------------------- which layers
@dataclass(frozen=True)
class LayerInfo:
    """A module's output on one example.

    Attributes:
        name: Its ``model.named_modules()`` name.
        kind: Class name.
        shape: Output of one example as a channel-first map ``(C, *S)`` (or ``(C,)``).
        channels_last: The module emits ``(N, *S, C)`` (Swin stages); captures move C first.
    """

    name: str
    kind: str
    shape: Tuple[int, ...]
    channels_last: bool = False


@dataclass
class _Call:
    calls: int = 0
    order: int = -1
    shape: Optional[Tuple[int, ...]] = None
    layout: Optional[str] = None
    on_path: bool = False
    tensor: Optional[torch.Tensor] = field(default=None, repr=False)


def _fits(spatial: Sequence[int], inp: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """Per-axis downsampling factors if ``spatial`` can be a map of an ``inp``-sized input."""
    if len(spatial) != len(inp) or any(s < 1 or s > i or i % s for s, i in zip(spatial, inp)):
        return None
    return tuple(i // s for s, i in zip(spatial, inp))


def feature_layout(shape: Sequence[int], input_spatial: Sequence[int]) -> Optional[str]:
    """``"cf"`` (``(N, C, *S)``), ``"cl"`` (``(N, *S, C)``), ``"vector"`` (``(N, C)``) or None.

    A map's spatial axes must divide the input's. When both orders fit (``C`` equal to a
    spatial size), the one with the same factor on every axis wins, then channel-first: a
    32-channel 32 x 32 map of a 64 x 64 input reads as channel-first, a Swin ``(N, 224, 224,
    16)`` output of a 224 x 224 input as channel-last.
    """
    if len(shape) == 2:
        return "vector"
    if len(shape) != len(input_spatial) + 2:
        return None
    options = []
    for layout, spatial in (("cf", shape[2:]), ("cl", shape[1:-1])):
        factors = _fits(spatial, input_spatial)
        if factors is not None:
            options.append((len(set(factors)) == 1, layout == "cf", layout))
    return max(options)[2] if options else None


def _trace(model: nn.Module, example: torch.Tensor) -> Dict[int, _Call]:
    """Calls, output shape/layout, forward order and output dependence of every module (by id)."""
    seen: Dict[int, _Call] = {}
    spatial = tuple(example.shape[2:])
    counter = [0]

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        rec = seen.setdefault(id(mod), _Call())
        rec.calls += 1
        if rec.calls > 1:
            return
        rec.order, counter[0] = counter[0], counter[0] + 1
        if isinstance(out, torch.Tensor):
            rec.shape, rec.layout = tuple(out.shape), feature_layout(out.shape, spatial)
            rec.tensor = out if out.requires_grad else None

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            x = example.detach().clone().requires_grad_(True)
            out = model(x)
            if isinstance(out, (list, tuple)):
                out = out[0]
            # A block is on the main path iff the output depends on it: deep-supervision heads
            # and other side branches get no gradient, whatever the code in between does.
            recs = [r for r in seen.values() if r.tensor is not None]
            grads = torch.autograd.grad(out.float().sum(), [r.tensor for r in recs], allow_unused=True) if recs else []
            for r, g in zip(recs, grads):
                r.on_path, r.tensor = g is not None, None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_container(m: nn.Module, ancestors: Tuple[type, ...], names: Mapping[int, str],
                  calls: Mapping[int, _Call]) -> bool:
    """A module to look inside rather than to measure (see `default_layers`)."""
    rec = calls.get(id(m))
    if rec is None or rec.calls != 1 or rec.layout not in ("cf", "cl"):
        return any(id(c) in calls for c in m.modules())  # lists, bypassed wrappers, list outputs
    if type(m) is nn.Sequential:
        return True
    own = names[id(m)]
    for sub in list(m.modules())[1:]:
        if type(sub) is type(m) or not names[id(sub)].startswith(own + "."):
            return True  # a recursive U-Net level, or a wrapper of blocks registered elsewhere
    return type(m) in ancestors


def _is_block(m: nn.Module, calls: Mapping[int, _Call]) -> bool:
    rec = calls.get(id(m))
    return (rec is not None and rec.calls == 1 and rec.layout in ("cf", "cl") and rec.on_path
            and _has_params(m) and not isinstance(m, _NORMS))


def _blocks_under(m: nn.Module, ancestors: Tuple[type, ...], names: Mapping[int, str],
                  calls: Mapping[int, _Call], out: Dict[int, nn.Module]) -> None:
    for child in m.children():
        if id(child) in out:
            continue
        if _is_container(child, ancestors, names, calls):
            _blocks_under(child, ancestors + (type(child),), names, calls, out)
        elif _is_block(child, calls):
            out[id(child)] = child


def _info(m: nn.Module, name: str, rec: _Call) -> LayerInfo:
    shape = rec.shape or ()
    cl = rec.layout == "cl"
    chw = (shape[-1], *shape[1:-1]) if cl else tuple(shape[1:])
    return LayerInfo(name, type(m).__name__, tuple(int(s) for s in chw), cl)


def default_layers(model: nn.Module, example: torch.Tensor) -> List[LayerInfo]:
    """The backbone's top-level blocks in forward order, found from one forward pass.

    Generic, so it serves every registered backbone: starting at the root, a module is
    *looked inside* when it is a container (``ModuleList``, plain ``nn.Sequential``, a wrapper
    not called itself, one returning a list), a recursive U-Net level (it contains, or sits
    inside, a module of its own class: MONAI's ``AttentionLayer``, DynUNet's skip layers), or a
    wrapper of blocks registered elsewhere; otherwise it is *a block* if it has parameters,
    runs once, returns a feature map (channel-first or channel-last, `feature_layout`), is
    not a bare normalisation layer, and the model output depends on it (deep-supervision
    heads do not). A lone block (``NNUNet.net``) is the whole network and is looked inside.

    Args:
        model: The network.
        example: One input ``(1, C_in, *patch)``.

    Returns:
        Blocks in the order their outputs are produced.
    """
    calls = _trace(model, example)
    names = {id(m): n for n, m in model.named_modules()}
    found: Dict[int, nn.Module] = {}
    _blocks_under(model, (), names, calls, found)
    while len(found) == 1:
        (only,) = found.values()
        inner: Dict[int, nn.Module] = {}
        _blocks_under(only, (type(only),), names, calls, inner)
        if not inner:
            break
        found = inner
    ordered = sorted(found.values(), key=lambda m: calls[id(m)].order)
    return [_info(m, names[id(m)], calls[id(m)]) for m in ordered]


def check_layers(model: nn.Module, layers: Sequence[str], defaults: Sequence[str] = (), where: str = "model") -> None:
    """Fail on names that are not ``model.named_modules()`` names.

    Raises:
        ConfigError: naming the unknown layers, close matches, and the valid choices (the
            default blocks and how many module names there are in all).
    """
    valid = [n for n, _ in model.named_modules() if n]
    unknown = [n for n in layers if n not in set(valid)]
    if not unknown:
        return
    hints = {n: difflib.get_close_matches(n, valid, n=3) for n in unknown}
    close = "; ".join(f"{n!r}: did you mean {', '.join(h)}?" for n, h in hints.items() if h)
    raise ConfigError(f"--layers: {where} has no module(s) {', '.join(map(repr, unknown))}"
                      f"{f' ({close})' if close else ''}. Valid: any of its {len(valid)} named modules, e.g. the "
                      f"default blocks {', '.join(defaults) if defaults else ', '.join(valid[:20])}")



__all__ = ["LayerInfo", "check_layers", "default_layers", "feature_layout"]
