"""The pixel pipeline against independent float64 references and pydicom's own LUT code."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi_lut

from cds_service.imaging import pixels
from cds_service.imaging.files import decode_image_bytes, read_image_file
from tests.imaging.conftest import rg1_file
from tests.imaging.makers import synthetic, to_bytes


def reference_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR, written out per pixel in float64, to 0..255."""
    out = np.empty(x.shape, dtype=np.float64)
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    for index, value in np.ndenumerate(x.astype(np.float64)):
        if value <= low:
            out[index] = 0.0
        elif value > high:
            out[index] = 255.0
        else:
            out[index] = ((value - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return out


@pytest.mark.parametrize(
    ("center", "width", "slope", "intercept"),
    [(15000, 30000, 1, 0), (2047.5, 4096, 1, 0), (40, 400, 1, -1024), (0.7, 1.3, 0.001, 0)],
)
def test_window_level_against_a_float64_reference(
    center: float, width: float, slope: float, intercept: float
) -> None:
    rng = np.random.default_rng(7)
    stored = rng.integers(0, 4096, (64, 48), dtype=np.uint16)

    def edit(ds: Dataset) -> None:
        ds.WindowCenter, ds.WindowWidth = center, width
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept

    ds = synthetic(stored, bits_stored=12, edit=edit)
    ours = decode_image_bytes(to_bytes(ds)).pixels
    reference = reference_window(stored * float(slope) + intercept, center, width)
    assert np.abs(ours.astype(np.float64) - reference).max() <= 0.5 + 1e-9


def test_rg1_window_against_float64_reference() -> None:
    import pydicom

    ds = pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))
    stored = ds.pixel_array[::16, ::16]
    reference = 255.0 - reference_window(stored, 15000, 30000)  # MONOCHROME1: inverted
    ours = read_image_file(rg1_file("RG1_UNCR.dcm")).pixels[::16, ::16]
    assert np.abs(ours - reference).max() <= 0.5 + 1e-9


def test_voi_lut_sequence_against_pydicom() -> None:
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 1024, (40, 30), dtype=np.uint16)
    lut_data = (np.sqrt(np.arange(800) / 799.0) * 4095).astype(np.uint16)  # 12-bit output

    def edit(ds: Dataset) -> None:
        item = Dataset()
        item.LUTDescriptor = [800, 100, 12]
        item.LUTData = lut_data.tolist()
        item["LUTData"].VR = "US"
        ds.VOILUTSequence = [item]
        ds.WindowCenter, ds.WindowWidth = 10, 20  # must be ignored: the LUT wins

    ds = synthetic(stored, bits_stored=10, edit=edit)
    decoded = decode_image_bytes(to_bytes(ds))
    assert decoded.notes == ("VOI LUT sequence",)
    theirs = apply_voi_lut(stored, ds, prefer_lut=True).astype(np.float64) / 4095 * 255
    assert np.abs(decoded.pixels - theirs).max() <= 0.5 + 1e-9


def test_monochrome1_equals_its_inverted_monochrome2_twin() -> None:
    rng = np.random.default_rng(11)
    stored = rng.integers(0, 2**14, (50, 70), dtype=np.uint16)

    def window(ds: Dataset) -> None:
        ds.WindowCenter, ds.WindowWidth = 8000, 12000

    mono1 = synthetic(stored, photometric="MONOCHROME1", bits_stored=14, edit=window)
    twin_values = (2**14 - 1 - stored).astype(np.uint16)

    def twin_window(ds: Dataset) -> None:  # the window mirrored onto the inverted values
        ds.WindowCenter, ds.WindowWidth = 2**14 - 1 - 8000 + 1, 12000

    mono2 = synthetic(twin_values, photometric="MONOCHROME2", bits_stored=14, edit=twin_window)
    a = decode_image_bytes(to_bytes(mono1)).pixels
    b = decode_image_bytes(to_bytes(mono2)).pixels
    assert np.abs(a.astype(int) - b).max() <= 1
    assert np.mean(a != b) < 0.01


def test_presentation_lut_inverse_inverts_once() -> None:
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)

    def inverse(ds: Dataset) -> None:
        ds.PresentationLUTShape = "INVERSE"

    plain = decode_image_bytes(to_bytes(synthetic(stored))).pixels
    mono2_inverse = decode_image_bytes(to_bytes(synthetic(stored, edit=inverse))).pixels
    mono1_inverse = decode_image_bytes(
        to_bytes(synthetic(stored, photometric="MONOCHROME1", edit=inverse))
    ).pixels
    assert np.array_equal(plain, stored)
    assert np.array_equal(mono2_inverse, 255 - stored)
    assert np.array_equal(mono1_inverse, 255 - stored)  # not inverted twice


def test_percentile_window_when_the_file_has_none() -> None:
    rng = np.random.default_rng(5)
    stored = rng.integers(1000, 3000, (100, 100), dtype=np.uint16)
    stored[0, :5] = 4095  # a few hot pixels must not squash the contrast
    decoded = decode_image_bytes(to_bytes(synthetic(stored, bits_stored=12)))
    assert any("percentile window" in note for note in decoded.notes)
    low, high = np.percentile(stored, [0.5, 99.5], method="inverted_cdf").astype(np.float64)
    reference = np.clip((stored - low) / (high - low), 0, 1) * 255
    assert np.abs(decoded.pixels - reference).max() <= 0.5 + 1e-9


def test_sigmoid_and_linear_exact_windows() -> None:
    x = np.linspace(-100, 100, 201)
    sigmoid = pixels.window_to_unit(x, pixels.Window(0, 50, "SIGMOID"))
    assert sigmoid[100] == pytest.approx(0.5) and sigmoid[0] < 0.001 and sigmoid[-1] > 0.999
    exact = pixels.window_to_unit(x, pixels.Window(0, 100, "LINEAR_EXACT"))
    assert exact[50] == 0 and exact[150] == 1 and exact[100] == 0.5
    with pytest.raises(ValueError):
        pixels.Window(0, 0.5, "LINEAR")


def test_colour_image_becomes_luminance() -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50

    def colour(ds: Dataset) -> None:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = 8, 8
        ds.PixelData = rgb.tobytes()

    decoded = decode_image_bytes(to_bytes(synthetic(rgb[..., 0], edit=colour)))
    assert decoded.pixels.shape == (8, 8)
    assert int(decoded.pixels[0, 0]) == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert "colour image: converted to luminance" in decoded.notes


@pytest.mark.parametrize("sequence", ["ModalityLUTSequence", "VOILUTSequence"])
def test_signed_image_lut_first_mapped_value_written_as_us_is_negative(sequence: str) -> None:
    """Pixel Representation 1 and a LUT Descriptor whose first mapped value -100 is written
    with VR US (65436): the LUT starts at -100, as pydicom reads it, not at 65436."""
    stored = np.tile(np.arange(-100, 200, dtype=np.int16), (4, 1))
    lut_data = (np.arange(300) * 10).astype(np.uint16)  # -100 -> 0 ... 199 -> 2990

    def edit(ds: Dataset) -> None:
        item = Dataset()
        item.LUTDescriptor = [300, 65536 - 100, 12]
        item["LUTDescriptor"].VR = "US"
        item.LUTData = lut_data.tolist()
        item["LUTData"].VR = "US"
        setattr(ds, sequence, [item])
        if sequence == "ModalityLUTSequence":
            ds.WindowCenter, ds.WindowWidth = 1495, 2991

    ds = synthetic(stored, bits_stored=16, edit=edit)
    pixels_out = decode_image_bytes(to_bytes(ds)).pixels.astype(np.float64)
    expected = np.round(lut_data[stored.astype(np.int64) + 100] / 4095 * 255)
    if sequence == "ModalityLUTSequence":
        expected = reference_window(lut_data[stored.astype(np.int64) + 100], 1495, 2991)
    assert pixels_out[0, 0] < pixels_out[0, -1]  # before the fix: one flat grey
    assert np.abs(pixels_out - expected).max() <= 0.5 + 1e-9
