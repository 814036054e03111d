"""An oblique NIfTI written the way scanners write it, for geometry tests (importable: ``data.oblique_nifti``)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from robustseg.data.io import write_image


def write_oblique_scanner_nifti(path: Path, image: np.ndarray) -> None:
    """A NIfTI as scanners write it: oblique, sform only, float32 rows not quite orthonormal.

    ITK orthonormalises such an sform on reading and writes new sform/qform from the result,
    so a mask written from the read geometry lands ~1e-5 away from the scan (the M&Ms files
    behave the same).
    """
    plain = path.with_name("plain_" + path.name.replace(".gz", ""))
    write_image(image, plain, (1.4844, 1.4844, 10.0), (-205.5, -149.3, 47.2))
    head = bytearray(plain.read_bytes())
    a, b = np.pi / 5, np.pi / 7  # two oblique rotations, as a short-axis cardiac view
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) @ \
        np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    affine = rot * np.array([1.4844, 1.4844, 10.0])
    affine[0, 1] += 3e-5  # the float rounding of a scanner's sform: not exactly orthogonal
    srow = np.hstack([affine, [[-205.5], [-149.3], [47.2]]]).astype("<f4")
    head[252:256] = np.array([0, 2], "<i2").tobytes()  # qform_code 0, sform_code 2 (aligned)
    head[280:328] = srow.tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(bytes(head))
    plain.unlink()

