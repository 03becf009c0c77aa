"""Apply a QC-measured scale to cell crops: resample them to the model's pixel size.

When reference-bead QC finds that the phase grid's pixel is ``pixel_um`` instead of the
nominal ``target_um`` (a magnification change), the acquisition computes every feature with
``pixel_um`` and resamples each crop about its centre to ``target_um`` pixels, so the
classifier sees cells at the scale it was trained at: a measured and corrected scale, not
a learned one. Phase values [rad] do not change with the scale; only the sampling does.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def rescale_crop(phase: np.ndarray, pixel_um: float, target_um: float, order: int = 3,
                 fill: float = 0.0) -> np.ndarray:
    """Resample a square crop from ``pixel_um`` to ``target_um`` pixels, same shape and centre.

    Output pixel ``i`` (from the centre ``c = (n - 1) / 2``) samples the input at
    ``c + (i - c) · target_um / pixel_um``: with a magnification 5 % above nominal
    (``pixel_um = target_um / 1.05``) the cell shrinks back by 1/1.05.

    Parameters
    ----------
    phase : numpy.ndarray
        (n, n) crop [rad] (or a boolean mask with ``order=0``).
    pixel_um, target_um : float
        Pixel size of the crop and of the output [µm].
    order : int
        Spline order (3 for phase, 0 for masks).
    fill : float
        Value outside the input crop (0 rad = background).

    Returns
    -------
    numpy.ndarray
        Resampled crop of the input's shape and dtype.
    """
    if not (pixel_um > 0 and target_um > 0):
        raise ValueError("pixel sizes must be > 0")
    s = float(target_um) / float(pixel_um)
    a = np.asarray(phase)
    if abs(s - 1.0) < 1e-9:
        return a.copy()
    c = (np.asarray(a.shape, dtype=np.float64) - 1.0) / 2.0
    offset = c - s * c
    src = a.astype(np.float32) if a.dtype == bool else a
    out = ndimage.affine_transform(src, np.array([s, s]), offset=offset, output_shape=a.shape,
                                   order=order, mode="constant", cval=fill, prefilter=order > 1)
    if a.dtype == bool:
        return out > 0.5
    return out.astype(a.dtype, copy=False)
