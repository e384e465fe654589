"""Bounded fuzzing of the decode path with mutated real files: every outcome is either an
image or an ImagingError (UnsupportedImage / NotAnalysable), never another exception."""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from cds_service.imaging.errors import ImagingError
from cds_service.imaging.files import decode_image_bytes
from cds_service.imaging.limits import ImageLimits
from tests.imaging.conftest import rg1_file, seed_file
from tests.imaging.makers import compressed_bytes, synthetic, to_bytes

LIMITS = ImageLimits(max_pixels=4_000_000, max_frames=64)
BUDGET_S = 20.0


def _crop() -> pydicom.Dataset:
    full = pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))
    crop = np.ascontiguousarray(full.pixel_array[900:964, 800:864])

    def window(ds: pydicom.Dataset) -> None:
        ds.WindowCenter, ds.WindowWidth = 15000, 30000

    return synthetic(crop, photometric="MONOCHROME1", bits_stored=15, edit=window)


def _samples() -> list[bytes]:
    crop = _crop()
    return [
        seed_file("dog-lateral-thorax-dx.dcm").read_bytes(),
        to_bytes(crop),
        compressed_bytes(crop, RLELossless),
        compressed_bytes(crop, JPEGLSLossless),
        compressed_bytes(crop, JPEG2000Lossless),
    ]


SAMPLES = _samples()
STARTED = time.monotonic()

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**7), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**7), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**7), st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, 10**7), st.integers(1, 64)),
)


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buffer = bytearray(data)
    for kind, position, value in edits:
        if not buffer:
            break
        at = position % len(buffer)
        if kind == "flip":
            buffer[at] ^= value
        elif kind == "cut":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = bytes([value])
        else:
            buffer[at : at + value] = bytes(min(value, len(buffer) - at))
    return bytes(buffer)


# pydicom warns about each oddity of a mutated file; the test is about what is raised.
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(
    max_examples=1200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    sample=st.integers(0, len(SAMPLES) - 1),
    edits=st.lists(mutation, min_size=1, max_size=6),
    header_bias=st.booleans(),
)
def test_mutated_files_never_crash(
    sample: int, edits: list[tuple[str, int, int]], header_bias: bool
) -> None:
    if time.monotonic() - STARTED > BUDGET_S:
        pytest.skip("fuzz time budget used up")  # bounded in time on slow machines
    data = SAMPLES[sample]
    if header_bias:  # most structure lives in the first kilobytes: aim there half the time
        edits = [(kind, position % 2048, value) for kind, position, value in edits]
    mutated = mutate(data, edits)
    try:
        decoded = decode_image_bytes(mutated, limits=LIMITS)
    except ImagingError as exc:
        assert exc.description  # a message a person can read
        return
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.ndim == 2
