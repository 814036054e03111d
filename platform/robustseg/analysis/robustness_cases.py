"""What `robustseg robustness` scores: models by URI, and evaluation cases on their original grids.

Where the evaluation cases come from. Motion is simulated on the *original* acquisition
grid (see `robustseg.analysis.robustness`), and a prepared store holds only preprocessed
(resampled, cropped, normalised) slices. So:

* ``data`` (a store URI, or its ``manifest.json``) chooses the cases: labelled, motion-free
  (``motion_level`` 0 or unknown: a scan that already moved would stack two motions),
  optionally of one held-out ``fold``, the first ``n_cases`` in manifest order. Their
  original volumes are re-read from the sources the manifest records (``data.sources`` of the
  prepare run), or from ``sources`` when the data has moved; each must have the shape the
  manifest recorded.
* ``sources`` alone gives the sources' labelled, motion-free cases: an external test set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from robustseg.errors import ConfigError, DataError


def model_name(uri: str) -> str:
    """Default display name of a ``--model``: checkpoint folder, ensemble folder, or ``name@alias``."""
    if uri.startswith(("models:/", "runs:/")):
        return uri.split(":/", 1)[1].strip("/")
    p = Path(uri)
    if p.suffix == ".pt":
        return p.parent.name if p.stem in ("best", "last") and p.parent.name else p.stem
    return p.name or str(p)


def load_segmenter(uri: str, *, device: Any = None, tracking_uri: Optional[str] = None,
                   full_fov: Optional[bool] = None) -> Tuple[Any, str]:
    """A segmenter (cases -> label maps on their grids) for a checkpoint, ensemble folder or MLflow URI.

    Args:
        uri: ``best.pt``, an ensemble folder, or ``models:/`` / ``runs:/`` URI.
        device: Inference device (default CUDA if available).
        tracking_uri: MLflow tracking URI for MLflow URIs.
        full_fov: Checkpoints only: as `predict_case` (None: the checkpoint decides; True: ``--full-fov``).

    Returns:
        ``(segmenter, task)``.

    Raises:
        ConfigError: a path that is neither a checkpoint nor an ensemble.
    """
    from robustseg.ensemble.predict import is_ensemble_uri

    if is_ensemble_uri(uri):
        from robustseg.ensemble.registry import load_ensemble

        ens, _ = load_ensemble(uri, tracking_uri, device)
        return ens.predict_cases, ens.spec.task
    if Path(uri).suffix == ".pt" and Path(uri).is_file():
        from robustseg.engine.predict import load_predictor, predict_case

        pred = load_predictor(uri, device)
        return (lambda cases: [predict_case(pred, c, full_fov=full_fov) for c in cases]), pred.task
    raise ConfigError(f"--model {uri}: not a checkpoint (.pt), an ensemble folder (spec.json) or a models:/ URI")


def _read_sources(specs: Sequence[Any], keep: Any, want: Optional[int]) -> List[Any]:
    """Validated cases of ``specs`` for which ``keep(case)`` holds; stop after ``want``."""
    from robustseg.data.cases import validate_case
    from robustseg.data.sources import read_source

    out: List[Any] = []
    for spec in specs:
        for case in read_source(spec.name, spec.path, **spec.options):
            if keep(case):
                out.append(validate_case(case))
                if want is not None and len(out) >= want:
                    return out
    return out


def load_eval_cases(data: Optional[str] = None, sources: Sequence[str] = (), fold: Optional[int] = None,
                    n_cases: Optional[int] = None) -> Tuple[List[Any], Dict[str, Any]]:
    """Evaluation cases on their original grids (see the module notes).

    Args:
        data: Store URI or its ``manifest.json``.
        sources: ``NAME:PATH[?k=v]`` sources (the original data; overrides the manifest's).
        fold: Held-out fold of the manifest.
        n_cases: At most this many cases.

    Returns:
        ``(cases, info)``; info records where they came from (for the outputs and MLflow).

    Raises:
        ConfigError: neither ``data`` nor ``sources``, or a fold without ``data`` / out of range.
        DataError: no usable cases, cases the sources do not hold, or a volume of another shape.
    """
    from robustseg.config import SourceSpec
    from robustseg.data.sources import parse_source_spec

    specs = [parse_source_spec(s) for s in sources]
    if n_cases is not None and n_cases < 1:
        raise ConfigError(f"--cases must be >= 1, got {n_cases}")
    if data is None:
        if not specs:
            raise ConfigError("robustness needs --data STORE (cases and folds of a prepared store) "
                              "or --source NAME:PATH")
        if fold is not None:
            raise ConfigError("--fold needs --data: folds are defined by the manifest the models were trained on")
        cases = _read_sources(specs, lambda c: c.label is not None and c.motion_level <= 0, n_cases)
        if not cases:
            raise DataError(", ".join(sources), "no labelled, motion-free cases")
        return cases, {"sources": list(sources)}

    from robustseg.data.manifest import MANIFEST, read_manifest
    from robustseg.data.storage import open_store

    uri = data[: -len(MANIFEST)].rstrip("/") if data.endswith(MANIFEST) else data
    manifest = read_manifest(open_store(uri))
    k = int(manifest.folds["k"])
    if fold is not None and not 0 <= fold < k:
        raise ConfigError(f"--fold {fold}: {manifest.uri} has folds 0..{k - 1}")
    labelled = [c for c in manifest.cases if c["has_label"] and (fold is None or c["fold"] == fold)]
    entries = [c for c in labelled if int(c.get("motion_level", -1)) <= 0]
    skipped = len(labelled) - len(entries)
    entries = entries[:n_cases] if n_cases else entries
    if not entries:
        raise DataError(manifest.uri, f"no labelled, motion-free cases{f' in fold {fold}' if fold is not None else ''}")
    if not specs:
        specs = [SourceSpec(**s) for s in manifest.data_config.get("sources", [])]
        if not specs:
            raise DataError(manifest.uri,
                            "the manifest records no sources: pass --source NAME:PATH (the original data)")
    wanted = {c["case_id"]: c for c in entries}
    found = {c.case_id: c for c in _read_sources(specs, lambda c: c.case_id in wanted, len(wanted))}
    missing = [cid for cid in wanted if cid not in found]
    where = ", ".join(f"{s.name}:{s.path}" for s in specs)
    if missing:
        raise DataError(where, f"{len(missing)} case(s) of {manifest.uri} not found in these sources "
                        f"(e.g. {missing[0]}); pass --source NAME:PATH pointing at the original data")
    for cid, entry in wanted.items():
        shape = list(found[cid].image.shape)
        if shape != list(entry["original_geometry"]["shape_zyx"]):
            prepared = entry["original_geometry"]["shape_zyx"]
            raise DataError(found[cid].source_path or cid, f"shape {shape} differs from the prepared "
                            f"{prepared}: not the data {manifest.uri} was made from")
    info = {"data": manifest.uri, "fold": fold, "sources": [f"{s.name}:{s.path}" for s in specs],
            "skipped_moving_cases": skipped}
    return [found[cid] for cid in wanted], info


__all__ = ["load_eval_cases", "load_segmenter", "model_name"]
