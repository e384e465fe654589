"""Files the project has never seen, made here: the right decision, the right image, and a
clear UnsupportedImage for every bad one (never a crash, never a huge allocation)."""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless

from cds_service.imaging.errors import NotAnalysable, UnsupportedImage
from cds_service.imaging.files import decode_image_bytes, read_image_file
from cds_service.imaging.limits import ImageLimits
from cds_service.imaging.selection import decide
from tests.imaging.conftest import rg1_file, seed_file
from tests.imaging.makers import compressed_bytes, jpeg_baseline_twin, read, synthetic, to_bytes

FILM = np.tile(np.arange(64, dtype=np.uint16) * 60, (48, 1))


def made(edit: object = None, **kwargs: object) -> bytes:
    return to_bytes(synthetic(FILM, bits_stored=12, edit=edit, **kwargs))  # type: ignore[arg-type]


def tags(**values: object) -> object:
    def edit(ds: Dataset) -> None:
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return edit


@pytest.mark.parametrize(
    ("edit", "modality", "reason"),
    [
        (tags(ViewPosition="LL"), "DX", "lateral view"),
        (tags(ViewPosition="RL"), "CR", "lateral view"),
        (tags(ViewPosition=None, SeriesDescription="CHEST LAT"), "DX", "lateral view"),
        (tags(ViewPosition="RLO"), "DX", "RLO view (not frontal)"),
        (None, "CT", "modality CT"),
        (None, "MR", "modality MR"),
        (tags(BodyPartExamined="SKULL"), "CR", "not a chest image"),
        (tags(BodyPartExamined="HAND"), "DX", "not a chest image"),
        (tags(PresentationIntentType="FOR PROCESSING"), "DX", "for processing"),
        (tags(PatientSpeciesDescription="Canis lupus familiaris"), "DX", "not a human"),
    ],
)
def test_not_analysable_files_get_a_precise_reason(
    edit: object, modality: str, reason: str
) -> None:
    data = made(edit, modality=modality)
    with pytest.raises(NotAnalysable) as caught:
        decode_image_bytes(data)
    assert reason in caught.value.reason
    assert str(caught.value).startswith("not analysed: ")
    # the image itself is readable: inspecting it without the check works
    assert decode_image_bytes(data, check_frontal_chest=False).pixels.shape == (48, 64)


@pytest.mark.parametrize(
    "edit",
    [
        None,
        tags(ViewPosition="AP"),
        tags(ViewPosition=None, BodyPartExamined=None),
        tags(SeriesDescription="CHEST PA AND LAT"),  # a study-level text naming both views
        tags(BodyPartExamined="THORAX"),
    ],
)
def test_frontal_chest_files_are_accepted(edit: object) -> None:
    decoded = decode_image_bytes(made(edit))
    assert decoded.selection.analysable
    assert decoded.pixels.dtype == np.uint8


def test_seed_and_sample_files_decisions() -> None:
    expectations = {
        seed_file("dog-lateral-thorax-dx.dcm"): "lateral view",
        seed_file("nih-cxr14-00000002_000-no-finding-dx.dcm"): None,
        seed_file("siim-cr-jpeg-baseline-no-pneumothorax.dcm"): None,
        seed_file("nema-rg1-cr-chest-pa-j2k-lossy.dcm"): None,
    }
    for path, reason in expectations.items():
        if reason is None:
            assert read_image_file(path).selection.analysable, path.name
        else:
            with pytest.raises(NotAnalysable, match=reason):
                read_image_file(path)


def test_seed_8bit_film_without_window_is_kept_exactly() -> None:
    import pydicom

    path = seed_file("nih-cxr14-00000002_000-no-finding-dx.dcm")
    assert np.array_equal(read_image_file(path).pixels, pydicom.dcmread(path).pixel_array)


def test_decide_without_modality() -> None:
    assert decide("", "CHEST", "PA") == "modality not stated"
    assert decide("CR", "", "") is None


def test_truncated_native_file_is_refused() -> None:
    data = rg1_file("RG1_UNCR.dcm").read_bytes()
    for cut in (len(data) // 2, int(len(data) * 0.99), 400, 140):
        with pytest.raises(UnsupportedImage):
            decode_image_bytes(data[:cut])


def test_truncated_compressed_file_is_refused() -> None:
    data = rg1_file("RG1_J2KR.dcm").read_bytes()
    for cut in (len(data) // 3, int(len(data) * 0.99)):
        with pytest.raises(UnsupportedImage):
            decode_image_bytes(data[:cut])


def _peak_bytes(action: object) -> int:
    tracemalloc.start()
    try:
        action()  # type: ignore[operator]
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_file_claiming_huge_rows_is_refused_before_allocation() -> None:
    data = made(tags(Rows=65535, Columns=65535))

    def decode() -> None:
        with pytest.raises(UnsupportedImage, match="pixel limit"):
            decode_image_bytes(data)

    assert _peak_bytes(decode) < 5 * 1024 * 1024


def test_a_file_claiming_huge_frame_counts_is_refused() -> None:
    with pytest.raises(UnsupportedImage, match="frame limit"):
        decode_image_bytes(made(tags(NumberOfFrames=10_000_000)))


def test_configurable_pixel_limit() -> None:
    with pytest.raises(UnsupportedImage, match="1000 pixel limit"):
        decode_image_bytes(made(), limits=ImageLimits(max_pixels=1000))


def test_compressed_frame_larger_than_its_header_is_refused() -> None:
    source = synthetic(np.zeros((256, 256), dtype=np.uint16), bits_stored=12)
    data = compressed_bytes(source, JPEG2000Lossless)
    import pydicom

    lying = pydicom.dcmread(io.BytesIO(data))
    lying.Rows, lying.Columns = 16, 16
    with pytest.raises(UnsupportedImage, match="compressed frame claims 256 x 256"):
        decode_image_bytes(to_bytes(lying))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a DICOM"),
        (b"hello, not an image", "not a DICOM"),
        (b"\0" * 128 + b"DICM" + b"\xff" * 200, "malformed|no pixel|not a DICOM"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "unreadable image"),
    ],
)
def test_garbage_is_refused_clearly(data: bytes, message: str) -> None:
    with pytest.raises(UnsupportedImage, match=message):
        decode_image_bytes(data)


def test_file_without_pixel_data() -> None:
    def drop(ds: Dataset) -> None:
        del ds.PixelData

    with pytest.raises(UnsupportedImage, match="no pixel data"):
        decode_image_bytes(made(drop))


def test_multi_frame_uses_the_first_frame_with_a_note() -> None:
    frames = np.stack([FILM, FILM[::-1], FILM * 0])
    decoded = decode_image_bytes(to_bytes(synthetic(frames, bits_stored=12)))
    single = decode_image_bytes(made())
    assert np.array_equal(decoded.pixels, single.pixels)
    assert decoded.notes[0] == "multi-frame (3 frames): first frame used"


def test_png_and_jpeg_pictures_become_grayscale() -> None:
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format=fmt)
        decoded = decode_image_bytes(buffer.getvalue())
        assert decoded.pixels.shape == (20, 30)
        assert abs(int(decoded.pixels.mean()) - round(0.587 * 200)) <= 2
        assert "converted to grayscale" in decoded.notes


def test_16_bit_png_is_refused() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 10), 4000, dtype=np.uint16)).save(buffer, format="PNG")
    with pytest.raises(UnsupportedImage, match="16-bit"):
        decode_image_bytes(buffer.getvalue())


def test_oversized_bytes_are_refused_before_parsing() -> None:
    with pytest.raises(UnsupportedImage, match="byte limit"):
        decode_image_bytes(made(), limits=ImageLimits(max_bytes=100))


def _described(description: str, view_code: str | None = None) -> bytes:
    def edit(ds: Dataset) -> None:
        del ds.ViewPosition
        ds.SeriesDescription = description
        if view_code is not None:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator = "R-10214", "SRT"
            item.CodeMeaning = view_code
            ds.ViewCodeSequence = [item]

    return to_bytes(synthetic(np.zeros((8, 8), dtype=np.uint8), edit=edit))


def test_description_naming_frontal_and_lateral_views_is_not_trusted_as_frontal() -> None:
    with pytest.raises(NotAnalysable, match="view not stated"):
        decode_image_bytes(_described("CHEST PA AND LAT"))
    with pytest.raises(NotAnalysable, match="lateral view"):
        decode_image_bytes(_described("CHEST PA AND LAT", view_code="left lateral"))
    with pytest.raises(NotAnalysable, match="lateral view"):
        decode_image_bytes(_described("CHEST LAT"))
    coded = decode_image_bytes(_described("CHEST PA AND LAT", view_code="postero-anterior"))
    assert coded.selection.analysable
    assert decode_image_bytes(_described("CHEST PA")).selection.analysable


def _with_first_frame_edited(data: bytes, edit: Callable[[bytearray], bytes]) -> bytes:
    from pydicom.encaps import encapsulate, get_frame

    ds = read(data)
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    ds.PixelData = encapsulate([edit(frame)])
    return to_bytes(ds)


def _small_film() -> Dataset:
    rng = np.random.default_rng(11)
    return synthetic(rng.integers(0, 256, (64, 48), dtype=np.uint8))


def _j2k_csiz(frame: bytearray, components: int) -> bytes:
    siz = frame.index(b"\xff\x51") + 2  # Lsiz; Csiz 36 bytes on
    frame[siz + 36 : siz + 38] = components.to_bytes(2, "big")
    return bytes(frame)


def _jpeg_sof(
    frame: bytearray, precision: int | None = None, components: int | None = None
) -> bytes:
    sof = frame.index(b"\xff\xc0")  # baseline SOF0: Lf(2) P(1) Y(2) X(2) Nf(1)
    if precision is not None:
        frame[sof + 4] = precision
    if components is not None:
        frame[sof + 9] = components
    return bytes(frame)


def test_compressed_frame_claiming_more_components_than_the_header_is_refused() -> None:
    j2k = compressed_bytes(_small_film(), JPEG2000Lossless)
    with pytest.raises(UnsupportedImage, match="claims 3000 components, header says 1"):
        decode_image_bytes(_with_first_frame_edited(j2k, lambda f: _j2k_csiz(f, 3000)))
    jpeg, _ = jpeg_baseline_twin(_small_film())
    with pytest.raises(UnsupportedImage, match="claims 3 components, header says 1"):
        decode_image_bytes(_with_first_frame_edited(jpeg, lambda f: _jpeg_sof(f, components=3)))


def test_compressed_frame_claiming_more_bits_than_allocated_is_refused() -> None:
    jpeg, _ = jpeg_baseline_twin(_small_film())
    with pytest.raises(UnsupportedImage, match="claims 16-bit samples, header allocates 8"):
        decode_image_bytes(_with_first_frame_edited(jpeg, lambda f: _jpeg_sof(f, precision=16)))


def test_compressed_frame_without_a_recognisable_header_is_refused_before_decoding() -> None:
    j2k = compressed_bytes(_small_film(), JPEG2000Lossless)
    for garble in (lambda f: b"\x00\x00" + bytes(f[2:]), lambda f: bytes(f[4:])):
        with pytest.raises(UnsupportedImage, match="no recognisable JPEG / JPEG 2000 header"):
            decode_image_bytes(_with_first_frame_edited(j2k, garble))
