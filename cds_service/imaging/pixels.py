"""The pixel pipeline as small pure functions: stored values -> 8-bit MONOCHROME2-looking image.

Order (DICOM PS3.3 C.11 and PS3.4 N.2): modality LUT (rescale slope/intercept or a Modality LUT
Sequence), VOI LUT (a VOI LUT Sequence, or window center/width, or a percentile window), to
the 0..255 range, then inversion for MONOCHROME1 / Presentation LUT Shape INVERSE.

Every function works on arrays of any shape. For integer images `voi_table` evaluates the same
functions once on every possible stored value and the image is mapped by table look-up: the
result is identical and much faster than float arithmetic on every pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64] | npt.NDArray[np.float32]
VoiFunction = Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"]
# Percentile window used when a file carries no VOI at all (documented in the README).
PERCENTILE_LOW = 0.5
PERCENTILE_HIGH = 99.5
# Rec. 601 luma weights (the same as PIL's "L" conversion).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Lut:
    """A DICOM LUT: descriptor (entries, first mapped value, bits) and its data."""

    first_mapped: int
    bits: int
    data: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        if self.data.ndim != 1 or self.data.size == 0:
            raise ValueError("a LUT needs at least one entry")
        if not 1 <= self.bits <= 16:
            raise ValueError(f"LUT bits must be 1..16, not {self.bits}")


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: VoiFunction = "LINEAR"

    def __post_init__(self) -> None:
        minimum = 0.0 if self.function == "LINEAR_EXACT" else 1.0
        if not np.isfinite(self.center) or not np.isfinite(self.width) or self.width < minimum:
            raise ValueError(f"invalid window center {self.center} / width {self.width}")


def rescale(values: FloatArray, slope: float, intercept: float) -> npt.NDArray[np.float64]:
    """Modality LUT by Rescale Slope and Intercept."""
    return values.astype(np.float64) * slope + intercept


def apply_lut(values: FloatArray, lut: Lut) -> npt.NDArray[np.float64]:
    """Look values up in a LUT; values before / after its range take the first / last entry."""
    index = np.clip(np.rint(values).astype(np.int64) - lut.first_mapped, 0, lut.data.size - 1)
    return lut.data[index]


def lut_to_unit(values: FloatArray, lut: Lut) -> npt.NDArray[np.float64]:
    """A VOI LUT's output scaled to 0..1 by its bit depth."""
    return apply_lut(values, lut) / float(2**lut.bits - 1)


def window_to_unit(values: FloatArray, window: Window) -> npt.NDArray[np.float64]:
    """Window center/width to 0..1 (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT, SIGMOID)."""
    x = values.astype(np.float64)
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if window.function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if w <= 1.0:
        return np.where(x > c - 0.5, 1.0, 0.0)
    return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def percentile_window(
    values: FloatArray, low: float = PERCENTILE_LOW, high: float = PERCENTILE_HIGH
) -> Window:
    """A LINEAR_EXACT window spanning the given percentiles of the values."""
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if hi <= lo:
        hi = lo + 1.0
    return Window(center=(lo + hi) / 2.0, width=hi - lo, function="LINEAR_EXACT")


def full_range_window(bits_stored: int, signed: bool) -> Window:
    """The identity window over the whole stored range: lowest value -> 0, highest -> 1
    (8-bit data with no VOI stay exactly as stored)."""
    low = -(2 ** (bits_stored - 1)) if signed else 0
    high = low + 2**bits_stored - 1
    return Window(center=(low + high) / 2, width=high - low, function="LINEAR_EXACT")


def unit_to_uint8(unit: FloatArray, invert: bool) -> npt.NDArray[np.uint8]:
    """0..1 to 0..255 (rounded to nearest), inverted for MONOCHROME1 / INVERSE."""
    scaled = np.clip(np.asarray(unit, dtype=np.float64), 0.0, 1.0) * 255.0
    if invert:
        scaled = 255.0 - scaled
    return np.rint(scaled).astype(np.uint8)


def luminance(rgb: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
    """Rec. 601 luma of an (..., 3) RGB array."""
    if rgb.shape[-1] != 3:
        raise ValueError("luminance needs an RGB array with 3 samples per pixel")
    weights = np.asarray(LUMA_WEIGHTS, dtype=np.float64)
    return np.asarray(rgb, dtype=np.float64) @ weights


def map_by_table(
    stored: npt.NDArray[np.integer], domain_start: int, table: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """Apply a table whose entry i is the uint8 value of stored value domain_start + i."""
    if domain_start == 0:
        return np.take(table, stored)
    return np.take(table, stored.astype(np.int64) - domain_start)


def first_number(value: object) -> float | None:
    """The first of a multi-valued DS (Window Center may list several windows)."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if not value:
            return None
        value = value[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None
