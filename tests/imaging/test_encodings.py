"""The NEMA RG1 chest film (1955 x 1841, 15-bit, MONOCHROME1) in every encoding gives the
same 8-bit image: lossless ones exactly, lossy ones within a stated tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from cds_service.imaging.errors import UnsupportedImage
from cds_service.imaging.files import decode_image_bytes, read_image_file
from tests.imaging.conftest import rg1_file, seed_file
from tests.imaging.makers import (
    big_endian_bytes,
    compressed_bytes,
    gdcm_converted,
    jpeg_baseline_twin,
    to_bytes,
)


@pytest.fixture(scope="module")
def original() -> np.ndarray:
    return read_image_file(rg1_file("RG1_UNCR.dcm")).pixels


@pytest.fixture(scope="module")
def rg1() -> pydicom.Dataset:
    return pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))


def test_original_is_the_inverted_monochrome1_film(original: np.ndarray) -> None:
    decoded = read_image_file(rg1_file("RG1_UNCR.dcm"))
    assert original.shape == (1955, 1841)
    assert "inverted (MONOCHROME1)" in decoded.notes
    # The lungs (dark on a MONOCHROME2-looking film) are darker than the mediastinum.
    lung, mediastinum = original[800:1000, 300:500], original[800:1000, 850:1000]
    assert lung.mean() + 40 < mediastinum.mean()


def test_jpeg2000_lossless_from_pydicom_data_is_identical(original: np.ndarray) -> None:
    decoded = read_image_file(rg1_file("RG1_J2KR.dcm"))
    assert decoded.transfer_syntax == JPEG2000Lossless
    assert np.array_equal(decoded.pixels, original)


def test_jpeg2000_lossy_matches_nemas_decompressed_reference(original: np.ndarray) -> None:
    """NEMA ships RG1_UNCI, the decompressed lossy stream: our decode must equal it exactly.
    Against the original, irreversible J2K may move grey levels: NEMA's own reference is at
    most 3 of 255 levels off (mean < 0.5), so that is the tolerance."""
    lossy = read_image_file(rg1_file("RG1_J2KI.dcm")).pixels
    nema_reference = read_image_file(rg1_file("RG1_UNCI.dcm")).pixels
    assert np.array_equal(lossy, nema_reference)
    difference = np.abs(lossy.astype(int) - original)
    assert difference.max() <= 3 and difference.mean() < 0.5


@pytest.mark.parametrize(
    ("name", "encode"),
    [
        ("explicit VR big endian", big_endian_bytes),
        ("RLE lossless", lambda ds: compressed_bytes(ds, RLELossless)),
        ("JPEG-LS lossless", lambda ds: compressed_bytes(ds, JPEGLSLossless)),
        ("JPEG 2000 lossless", lambda ds: compressed_bytes(ds, JPEG2000Lossless)),
    ],
)
def test_lossless_encodings_made_here_are_identical(
    name: str, encode: object, rg1: pydicom.Dataset, original: np.ndarray
) -> None:
    data = encode(rg1)  # type: ignore[operator]
    assert np.array_equal(decode_image_bytes(data).pixels, original), name


def test_jpeg_lossless_made_by_gdcm_is_identical(tmp_path: Path, original: np.ndarray) -> None:
    data = gdcm_converted(rg1_file("RG1_UNCR.dcm"), tmp_path / "ll.dcm", JPEGLosslessSV1)
    decoded = decode_image_bytes(data)
    assert decoded.transfer_syntax == JPEGLosslessSV1
    assert np.array_equal(decoded.pixels, original)


def test_jpeg_ls_near_lossless_stays_within_one_grey_level(
    rg1: pydicom.Dataset, original: np.ndarray
) -> None:
    """NEAR=2 bounds each 15-bit stored value to +-2; the window maps 30000 stored values to
    256 levels, so the 8-bit image may move by rounding only: at most 1 level."""
    data = compressed_bytes(rg1, JPEGLSNearLossless, jls_error=2)
    difference = np.abs(decode_image_bytes(data).pixels.astype(int) - original)
    assert difference.max() <= 1


def test_jpeg_baseline_within_one_level_of_pillows_decode() -> None:
    """An 8-bit film re-encoded as JPEG Baseline: GDCM's decode (ours) against Pillow's
    (libjpeg-turbo), an independent decoder: IDCT rounding may differ by one level."""
    source = pydicom.dcmread(seed_file("nih-cxr14-00000002_000-no-finding-dx.dcm"))
    data, reference = jpeg_baseline_twin(source)
    decoded = decode_image_bytes(data)
    assert np.abs(decoded.pixels.astype(int) - reference).max() <= 1


def test_seed_jpeg_baseline_file_decodes_like_pillow() -> None:
    import io

    from PIL import Image
    from pydicom.encaps import generate_fragmented_frames

    data = seed_file("siim-cr-jpeg-baseline-no-pneumothorax.dcm").read_bytes()
    dataset = pydicom.dcmread(io.BytesIO(data))
    frame = b"".join(next(generate_fragmented_frames(dataset.PixelData)))
    reference = np.asarray(Image.open(io.BytesIO(frame)).convert("L"))
    assert np.abs(decode_image_bytes(data).pixels.astype(int) - reference).max() <= 1


def test_twelve_bit_jpeg_extended_is_refused_clearly(tmp_path: Path, rg1: pydicom.Dataset) -> None:
    twelve = rg1.copy()
    twelve.PixelData = (rg1.pixel_array >> 3).astype(np.uint16).tobytes()
    twelve.BitsStored, twelve.HighBit = 12, 11
    source = tmp_path / "12.dcm"
    source.write_bytes(to_bytes(twelve))
    data = gdcm_converted(source, tmp_path / "ext.dcm", JPEGExtended12Bit)
    with pytest.raises(UnsupportedImage, match="pylibjpeg-libjpeg"):
        decode_image_bytes(data)
