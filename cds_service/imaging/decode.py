"""DICOM bytes -> dataset -> first frame's pixels -> 8-bit image, refusing unsafe input early.

Codec plugins (see README "Imaging codecs"): pylibjpeg + pylibjpeg-openjpeg for JPEG 2000,
pyjpegls for JPEG-LS, python-gdcm for the JPEG processes (baseline, extended 12-bit, lossless),
pydicom itself for uncompressed and RLE. One plugin per transfer syntax, so a result never
depends on which optional package happens to be installed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib.util import find_spec

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from cds_service.imaging import codestream
from cds_service.imaging.errors import UnsupportedImage
from cds_service.imaging.limits import DEFAULT_LIMITS, ImageLimits

PLUGIN_BY_TRANSFER_SYNTAX: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "gdcm",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "gdcm",  # JPEG Extended (8-bit; 12-bit see below)
    "1.2.840.10008.1.2.4.57": "gdcm",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "gdcm",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.5": "pydicom",  # RLE Lossless
}
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
NATIVE_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
)


@dataclass(frozen=True)
class Geometry:
    """What the header claims about the pixels, checked against the limits before decoding."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    transfer_syntax: str

    @property
    def pixels_per_frame(self) -> int:
        return self.rows * self.columns * self.samples


def read_dataset(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Dataset:
    """Parse DICOM Part 10 bytes; any parse failure is an UnsupportedImage."""
    if len(data) > limits.max_bytes:
        raise UnsupportedImage(f"file is larger than the {limits.max_bytes} byte limit")
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        dataset.file_meta.TransferSyntaxUID  # noqa: B018 - must exist for pixel data
    except InvalidDicomError as exc:
        raise UnsupportedImage("not a DICOM file (no DICM preamble)") from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed input
        raise UnsupportedImage(f"malformed DICOM file ({type(exc).__name__})") from exc
    return dataset


def _int_tag(dataset: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = dataset.get(keyword, default)
        if value is None or value == "":
            raise UnsupportedImage(f"the file has no {keyword}")
        return int(value)
    except UnsupportedImage:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedImage(f"unreadable {keyword}") from exc


def geometry(dataset: Dataset, limits: ImageLimits = DEFAULT_LIMITS) -> Geometry:
    """The pixel geometry from the header, refused when it exceeds the limits."""
    if "PixelData" not in dataset:
        raise UnsupportedImage("the file holds no pixel data")
    try:
        syntax = str(dataset.file_meta.TransferSyntaxUID)
        photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedImage("unreadable transfer syntax or photometric interpretation") from exc
    frames = _int_tag(dataset, "NumberOfFrames", 1) or 1
    shape = Geometry(
        rows=_int_tag(dataset, "Rows"),
        columns=_int_tag(dataset, "Columns"),
        frames=frames,
        samples=_int_tag(dataset, "SamplesPerPixel", 1),
        bits_allocated=_int_tag(dataset, "BitsAllocated"),
        bits_stored=_int_tag(dataset, "BitsStored"),
        signed=_int_tag(dataset, "PixelRepresentation", 0) == 1,
        photometric=photometric,
        transfer_syntax=syntax,
    )
    _check_limits(shape, limits)
    return shape


def _check_limits(shape: Geometry, limits: ImageLimits) -> None:
    if shape.rows <= 0 or shape.columns <= 0 or shape.frames <= 0:
        raise UnsupportedImage("the file claims an empty image")
    if shape.samples not in (1, 3):
        raise UnsupportedImage(f"{shape.samples} samples per pixel are not supported")
    if shape.bits_allocated not in (8, 16) or not 1 <= shape.bits_stored <= shape.bits_allocated:
        raise UnsupportedImage(
            f"bits allocated {shape.bits_allocated} / stored {shape.bits_stored} not supported"
        )
    if shape.pixels_per_frame > limits.max_pixels:
        raise UnsupportedImage(
            f"image of {shape.rows} x {shape.columns} x {shape.samples} exceeds the "
            f"{limits.max_pixels} pixel limit"
        )
    if shape.frames > limits.max_frames:
        raise UnsupportedImage(f"{shape.frames} frames exceed the {limits.max_frames} frame limit")
    if shape.transfer_syntax not in NATIVE_SYNTAXES | PLUGIN_BY_TRANSFER_SYNTAX.keys():
        name = UID(shape.transfer_syntax).name
        raise UnsupportedImage(f"transfer syntax {name} is not supported")


def _check_native_length(dataset: Dataset, shape: Geometry) -> None:
    expected = shape.pixels_per_frame * (shape.bits_allocated // 8)
    if len(dataset.PixelData) < expected:
        raise UnsupportedImage("pixel data are truncated")


def _check_first_frame(dataset: Dataset, shape: Geometry) -> None:
    try:
        frame = get_frame(dataset.PixelData, 0, number_of_frames=shape.frames)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedImage("encapsulated pixel data are malformed") from exc
    if shape.transfer_syntax == "1.2.840.10008.1.2.5":  # RLE: sizes are not in the stream
        return
    claimed = codestream.frame_header(frame)
    if claimed is None:
        raise UnsupportedImage("the compressed frame has no recognisable JPEG / JPEG 2000 header")
    check_frame_header(claimed, shape)


def check_frame_header(claimed: codestream.FrameHeader, shape: Geometry) -> None:
    """The frame's own header must agree with the DICOM header before a decoder sees it: the
    decoder allocates what the frame claims (rows x columns x components x precision)."""
    if (claimed.rows, claimed.columns) != (shape.rows, shape.columns):
        raise UnsupportedImage(
            f"compressed frame claims {claimed.rows} x {claimed.columns}, header says "
            f"{shape.rows} x {shape.columns}"
        )
    if claimed.components != shape.samples:
        raise UnsupportedImage(
            f"compressed frame claims {claimed.components} components, header says "
            f"{shape.samples} samples per pixel"
        )
    if claimed.precision > shape.bits_allocated:
        raise UnsupportedImage(
            f"compressed frame claims {claimed.precision}-bit samples, header allocates "
            f"{shape.bits_allocated} bits"
        )


def _twelve_bit_jpeg_plugin() -> str:
    """12-bit JPEG Extended: pydicom decodes it only with pylibjpeg-libjpeg (GPL-3), which the
    project does not install; it is used when a deployment has installed it on purpose."""
    if (
        find_spec("libjpeg") is not None
        and "pylibjpeg" in get_decoder(UID(JPEG_EXTENDED)).available_plugins
    ):
        return "pylibjpeg"
    raise UnsupportedImage(
        "12-bit JPEG Extended needs the GPL-3 plugin pylibjpeg-libjpeg, which is not installed"
    )


def first_frame(dataset: Dataset, shape: Geometry) -> npt.NDArray[np.generic]:
    """Decode only the first frame with the plugin chosen for its transfer syntax."""
    native = shape.transfer_syntax in NATIVE_SYNTAXES
    if native:
        _check_native_length(dataset, shape)
    else:
        _check_first_frame(dataset, shape)
    plugin = "" if native else PLUGIN_BY_TRANSFER_SYNTAX[shape.transfer_syntax]
    if shape.transfer_syntax == JPEG_EXTENDED and shape.bits_stored > 8:
        plugin = _twelve_bit_jpeg_plugin()
    try:
        dataset.pixel_array_options(index=0, decoding_plugin=plugin)
        array = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt data
        raise UnsupportedImage(f"the pixel data cannot be decoded ({type(exc).__name__})") from exc
    expected = (shape.rows, shape.columns) + ((3,) if shape.samples == 3 else ())
    if array.shape != expected:
        raise UnsupportedImage(f"decoded shape {array.shape} does not match the header")
    return array
