"""Synthetic sources: generated cine CMR (with motion levels) and lung CT, no files needed.

``synthetic_cmr`` and ``synthetic_ct`` let the demo, the tests and a laptop run the whole
pipeline without downloading data. The ``path`` argument every source takes is ignored here:
pass ``""``, on the CLI ``--source 'synthetic_cmr:?n_subjects=6&motion_levels=[0,3]'``.
Options may arrive as strings or lists of strings from the CLI or YAML, so they are
coerced here, and a value that cannot be coerced fails naming the option.
"""
from __future__ import annotations

from typing import Any, Iterator, Tuple

from robustseg.data.cases import Case
from robustseg.data.synthetic import iter_cardiac_cases, iter_ct_cases
from robustseg.errors import ConfigError
from robustseg.registry import SOURCES


def _as_int(value: Any, option: str) -> int:
    """An integer option given as int, integral float or numeric string."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):
            value = value.strip()
            return int(value)
        if float(value) != int(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"source option {option}: expected an integer, got {value!r}") from None


def _as_int_tuple(value: Any, option: str) -> Tuple[int, ...]:
    """A list of integers given as a sequence, a single value, or "0,1,2" / "[0, 2]" / "128x128"."""
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
        if not parts:
            raise ConfigError(f"source option {option}: expected a list of integers, got {value!r}")
        return tuple(_as_int(p, option) for p in parts)
    if isinstance(value, (list, tuple)):
        return tuple(_as_int(v, option) for v in value)
    return (_as_int(value, option),)


def _as_bool(value: Any, option: str) -> bool:
    """A boolean option given as bool, 0/1 or a yes/no word."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off", ""):
        return False
    raise ConfigError(f"source option {option}: expected true or false, got {value!r}")


def _as_size(value: Any) -> Tuple[int, int]:
    size = _as_int_tuple(value, "size")
    if len(size) == 1:
        size = size * 2  # a single number means a square slice
    if len(size) != 2 or min(size) < 32:
        raise ConfigError(f"source option size: expected (y, x) of at least 32 pixels each, got {value!r}")
    return size[0], size[1]


@SOURCES.register("synthetic_cmr")
def read_synthetic_cmr(
    path: str = "",
    n_subjects: Any = 10,
    seed: Any = 0,
    motion_levels: Any = (0, 1, 2, 3),
    size: Any = (128, 128),
) -> Iterator[Case]:
    """Yield a synthetic short-axis cine CMR dataset (canonical labels 1 LV, 2 MYO, 3 RV).

    Args:
        path: Ignored (there is nothing to read); any value, usually "".
        n_subjects: Number of subjects; each gives ED and ES.
        seed: Dataset seed; the same options always give bit-identical cases.
        motion_levels: CMRxMotion levels to produce per phase (0 = clean; 1-3 = k-space
            respiratory motion with the clean label), e.g. ``[0, 2]`` or ``"0,1,2,3"``.
        size: In-plane size ``(y, x)``, e.g. ``[128, 128]``, ``"128x128"`` or ``128``.

    Returns:
        A lazy iterator of cases, subject by subject (ids ``syn0003_ED``, ``syn0003_ED_m2``).

    Raises:
        ConfigError: an option that cannot be coerced or is out of range.
    """
    del path  # generated, not read
    levels = _as_int_tuple(motion_levels, "motion_levels")
    bad = [v for v in levels if v not in (0, 1, 2, 3)]
    if bad:
        raise ConfigError(f"source option motion_levels: {bad} are not CMRxMotion levels (0, 1, 2, 3)")
    n = _as_int(n_subjects, "n_subjects")
    if n < 0:
        raise ConfigError(f"source option n_subjects: must be >= 0, got {n_subjects!r}")
    # Options are checked now, not at the first next(): a bad CLI value fails immediately.
    return iter_cardiac_cases(n, _as_int(seed, "seed"), levels, _as_size(size))


@SOURCES.register("synthetic_ct")
def read_synthetic_ct(path: str = "", n_subjects: Any = 10, seed: Any = 0, multiclass: Any = False) -> Iterator[Case]:
    """Yield a synthetic chest CT dataset with lung-infection labels (HU images).

    Args:
        path: Ignored (there is nothing to read); any value, usually "".
        n_subjects: Number of subjects, one case each.
        seed: Dataset seed.
        multiclass: Labels 1 ground-glass / 2 consolidation ("lung_multiclass") instead of
            1 = infection ("lung_binary"); accepts booleans, 0/1 and true/false strings.

    Returns:
        A lazy iterator with one case per subject (ids ``synct0000``, ...).

    Raises:
        ConfigError: an option that cannot be coerced or is out of range.
    """
    del path  # generated, not read
    n = _as_int(n_subjects, "n_subjects")
    if n < 0:
        raise ConfigError(f"source option n_subjects: must be >= 0, got {n_subjects!r}")
    return iter_ct_cases(n, _as_int(seed, "seed"), _as_bool(multiclass, "multiclass"))


__all__ = ["read_synthetic_cmr", "read_synthetic_ct"]
