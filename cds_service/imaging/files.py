"""Bytes or a file -> the 8-bit image the model sees (DICOM through the pixel pipeline, PNG or
JPEG as grayscale), with notes and the frontal-chest decision."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from cds_service.imaging import decode, display, selection
from cds_service.imaging.errors import UnsupportedImage
from cds_service.imaging.limits import DEFAULT_LIMITS, ImageLimits

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class DecodedImage:
    """The 8-bit MONOCHROME2-looking image (H x W uint8), what was done, and the decision."""

    pixels: npt.NDArray[np.uint8]
    notes: tuple[str, ...]
    selection: selection.Selection
    source_format: str  # "dicom", "png" or "jpeg"
    transfer_syntax: str = ""


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def decode_dicom_bytes(
    data: bytes, *, check_frontal_chest: bool = True, limits: ImageLimits = DEFAULT_LIMITS
) -> DecodedImage:
    dataset = decode.read_dataset(data, limits)
    shape = decode.geometry(dataset, limits)  # unreadable wins over "not analysable"
    chosen = selection.select_dataset(dataset)
    if check_frontal_chest:
        selection.require_frontal_chest(chosen)
    array = decode.first_frame(dataset, shape)
    image, notes = display.to_8bit(dataset, array, shape)
    if shape.frames > 1:
        notes = (f"multi-frame ({shape.frames} frames): first frame used",) + notes
    return DecodedImage(image, notes, chosen, "dicom", shape.transfer_syntax)


def decode_picture_bytes(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> DecodedImage:
    """PNG or JPEG to 8-bit grayscale; no tags, so no frontal-chest decision is possible."""
    try:
        with Image.open(io.BytesIO(data)) as picture:
            width, height = picture.size
            if width * height > limits.max_pixels:
                raise UnsupportedImage(f"image exceeds the {limits.max_pixels} pixel limit")
            fmt = (picture.format or "").lower()
            notes = [] if picture.mode in ("L", "I;16", "I") else ["converted to grayscale"]
            if picture.mode in ("I;16", "I"):
                raise UnsupportedImage("16-bit PNG has no window: send DICOM instead")
            gray = np.asarray(picture.convert("L"))
    except UnsupportedImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnsupportedImage(f"unreadable image ({type(exc).__name__})") from exc
    unknown = selection.Selection(
        analysable=True, reason="picture file: view and body part not stated", pixels=gray.size
    )
    notes.append("picture file: view and body part cannot be checked")
    return DecodedImage(gray, tuple(notes), unknown, fmt or "picture")


def decode_image_bytes(
    data: bytes, *, check_frontal_chest: bool = True, limits: ImageLimits = DEFAULT_LIMITS
) -> DecodedImage:
    """DICOM (through the pixel pipeline) or PNG / JPEG bytes -> DecodedImage.

    Raises UnsupportedImage for anything unreadable and, when `check_frontal_chest`,
    NotAnalysable for DICOM images that are not frontal chest radiographs.
    """
    if len(data) > limits.max_bytes:
        raise UnsupportedImage(f"file is larger than the {limits.max_bytes} byte limit")
    if is_dicom(data):
        return decode_dicom_bytes(data, check_frontal_chest=check_frontal_chest, limits=limits)
    if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
        return decode_picture_bytes(data, limits)
    raise UnsupportedImage("not a DICOM, PNG or JPEG file")


def read_image_file(
    path: str | Path, *, check_frontal_chest: bool = True, limits: ImageLimits = DEFAULT_LIMITS
) -> DecodedImage:
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > limits.max_bytes:
            raise UnsupportedImage(f"file is larger than the {limits.max_bytes} byte limit")
        data = file.read_bytes()
    except OSError as exc:
        raise UnsupportedImage(f"cannot read {file.name}: {exc.strerror}") from exc
    return decode_image_bytes(data, check_frontal_chest=check_frontal_chest, limits=limits)
