"""8-bit images to PNG bytes (what `cxr-cds dicom render` writes and the app shows)."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
from PIL import Image


def png_bytes(pixels: npt.NDArray[np.uint8]) -> bytes:
    """A lossless 8-bit grayscale PNG of a 2-D uint8 array."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError("png_bytes needs a 2-D uint8 image")
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
