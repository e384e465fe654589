"""Decoded stored values -> the 8-bit MONOCHROME2-looking image, with notes on what was done."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut

from cds_service.imaging import pixels
from cds_service.imaging.decode import Geometry
from cds_service.imaging.errors import UnsupportedImage

UnitMap = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]
_TABLE_DOMAIN_LIMIT = 1 << 20


@dataclass(frozen=True)
class DisplayPlan:
    """How stored values become 0..1 (modality then VOI) and whether to invert afterwards."""

    modality: UnitMap
    voi: UnitMap | None  # None: percentile window, decided from the image itself
    invert: bool
    notes: tuple[str, ...]


def signed_first_mapped(first: int, signed: bool) -> int:
    """A LUT Descriptor's first mapped value: for signed pixel data (Pixel Representation 1) it
    is a signed 16-bit value even when written with VR US (PS3.3 C.11.1.1, C.11.2.1.1)."""
    return first - (1 << 16) if signed and first >= 1 << 15 else first


def _lut_from_item(item: Dataset, what: str, signed: bool) -> pixels.Lut:
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        first = signed_first_mapped(first, signed)
        raw = item.LUTData
        data = np.asarray(raw if not isinstance(raw, bytes) else np.frombuffer(raw, "<u2"))
        data = data.astype(np.float64).ravel()
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedImage(f"unreadable {what}") from exc
    entries = entries or 65536
    if data.size < entries:
        raise UnsupportedImage(f"{what} has fewer entries than its descriptor says")
    if bits not in range(1, 17):
        bits = 16 if data.max(initial=0) > 255 else 8
    return pixels.Lut(first_mapped=first, bits=bits, data=data[:entries])


def _modality_map(dataset: Dataset, signed: bool) -> tuple[UnitMap, list[str]]:
    sequence = dataset.get("ModalityLUTSequence")
    if sequence:
        lut = _lut_from_item(sequence[0], "Modality LUT Sequence", signed)
        return (lambda v: pixels.apply_lut(v, lut)), ["modality LUT sequence applied"]
    slope = pixels.first_number(dataset.get("RescaleSlope"))
    intercept = pixels.first_number(dataset.get("RescaleIntercept"))
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = intercept or 0.0
    notes = [] if (slope, intercept) == (1.0, 0.0) else [f"rescale {slope:g} x + {intercept:g}"]
    return (lambda v: pixels.rescale(v, slope, intercept)), notes


def _voi_map(dataset: Dataset, shape: Geometry, rescaled: bool) -> tuple[UnitMap | None, list[str]]:
    sequence = dataset.get("VOILUTSequence")
    if sequence:
        lut = _lut_from_item(sequence[0], "VOI LUT Sequence", shape.signed)
        note = "VOI LUT sequence" + (" (first of several)" if len(sequence) > 1 else "")
        return (lambda v: pixels.lut_to_unit(v, lut)), [note]
    center = pixels.first_number(dataset.get("WindowCenter"))
    width = pixels.first_number(dataset.get("WindowWidth"))
    function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if center is not None and width is not None:
        try:
            window = pixels.Window(center, width, function)  # type: ignore[arg-type]
        except ValueError:
            window = None
        if window is not None:
            raw_center = dataset.get("WindowCenter")
            several = isinstance(raw_center, MultiValue) and len(raw_center) > 1
            note = f"window {center:g}/{width:g}" + (" (first of several)" if several else "")
            return (lambda v: pixels.window_to_unit(v, window)), [note]
    if shape.bits_stored <= 8 and not rescaled:
        window = pixels.full_range_window(shape.bits_stored, shape.signed)
        return (lambda v: pixels.window_to_unit(v, window)), ["no window: stored 8-bit values"]
    return None, [
        f"no window in the file: {pixels.PERCENTILE_LOW:g}-{pixels.PERCENTILE_HIGH:g} "
        "percentile window"
    ]


def plan_for(dataset: Dataset, shape: Geometry) -> DisplayPlan:
    """Read the modality LUT, VOI and inversion a grayscale image asks for."""
    modality, modality_notes = _modality_map(dataset, shape.signed)
    voi, voi_notes = _voi_map(dataset, shape, rescaled=bool(modality_notes))
    presentation_inverse = str(dataset.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    invert = shape.photometric == "MONOCHROME1" or presentation_inverse
    notes = modality_notes + voi_notes
    if invert:
        why = "MONOCHROME1" if shape.photometric == "MONOCHROME1" else "Presentation LUT INVERSE"
        notes.append(f"inverted ({why})")
    return DisplayPlan(modality=modality, voi=voi, invert=invert, notes=tuple(notes))


def _weighted_percentile_window(
    values: npt.NDArray[np.float64], counts: npt.NDArray[np.int64]
) -> pixels.Window:
    """Percentile window (inverted-CDF percentiles) of values that occur `counts` times."""
    order = np.argsort(values, kind="stable")
    sorted_values, cumulative = values[order], np.cumsum(counts[order])
    total = float(cumulative[-1])

    def at(q: float) -> float:
        index = int(np.searchsorted(cumulative, q / 100.0 * total, side="left"))
        return float(sorted_values[min(index, sorted_values.size - 1)])

    low, high = at(pixels.PERCENTILE_LOW), at(pixels.PERCENTILE_HIGH)
    if high <= low:
        high = low + 1.0
    return pixels.Window((low + high) / 2.0, high - low, "LINEAR_EXACT")


def grayscale_to_8bit(stored: npt.NDArray[np.integer], plan: DisplayPlan) -> npt.NDArray[np.uint8]:
    """Apply the plan to an integer image, through a table over its stored value range."""
    low, high = int(stored.min()), int(stored.max())
    if low >= 0:
        low = 0  # unsigned data index the table directly: no per-pixel offset needed
    if high - low >= _TABLE_DOMAIN_LIMIT:
        raise UnsupportedImage("stored value range too large for an 8-bit conversion")
    domain = np.arange(low, high + 1, dtype=np.float64)
    modality_values = plan.modality(domain)
    if plan.voi is None:
        counts = np.bincount((stored.ravel() - low).astype(np.intp), minlength=domain.size)
        window = _weighted_percentile_window(modality_values, counts.astype(np.int64))
        unit = pixels.window_to_unit(modality_values, window)
    else:
        unit = plan.voi(modality_values)
    table = pixels.unit_to_uint8(unit, plan.invert)
    return pixels.map_by_table(stored, low, table)


def colour_to_8bit(
    dataset: Dataset, array: npt.NDArray[np.generic], shape: Geometry
) -> tuple[npt.NDArray[np.uint8], tuple[str, ...]]:
    """RGB / YBR (already RGB from pydicom) / PALETTE COLOR to 8-bit luminance."""
    rgb: npt.NDArray[np.generic] = array
    notes = ["colour image: converted to luminance"]
    if shape.photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(array, dataset)
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedImage("unreadable palette colour LUT") from exc
        notes = ["palette colour image: converted to luminance"]
    peak = 255.0 if rgb.dtype.itemsize == 1 else float(2 ** min(shape.bits_stored, 16) - 1)
    unit = pixels.luminance(rgb) / peak
    return pixels.unit_to_uint8(unit, invert=False), tuple(notes)


def to_8bit(
    dataset: Dataset, array: npt.NDArray[np.generic], shape: Geometry
) -> tuple[npt.NDArray[np.uint8], tuple[str, ...]]:
    """The 8-bit MONOCHROME2-looking image of one decoded frame, and what was done to it."""
    if shape.samples == 3 or shape.photometric == "PALETTE COLOR":
        return colour_to_8bit(dataset, array, shape)
    if shape.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImage(f"photometric interpretation {shape.photometric!r} not supported")
    if not np.issubdtype(array.dtype, np.integer):
        raise UnsupportedImage("non-integer pixel data are not supported")
    plan = plan_for(dataset, shape)
    return grayscale_to_8bit(array, plan), plan.notes  # type: ignore[arg-type]
