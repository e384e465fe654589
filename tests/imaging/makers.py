"""Build DICOM files the project has never seen, in the test itself (no fixtures on disk)."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)


def to_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def big_endian_bytes(dataset: Dataset) -> bytes:
    """The same dataset as Explicit VR Big Endian (pixel words byte-swapped)."""
    twin = copy.deepcopy(dataset)
    pixels = dataset.pixel_array
    twin.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    twin.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    buffer = io.BytesIO()
    dcmwrite(buffer, twin, implicit_vr=False, little_endian=False, force_encoding=True)
    return buffer.getvalue()


def compressed_bytes(dataset: Dataset, syntax: str, **options: object) -> bytes:
    twin = copy.deepcopy(dataset)
    twin.compress(syntax, **options)
    return to_bytes(twin)


def gdcm_converted(source: Path, target: Path, syntax: str) -> bytes:
    """Re-encode a file with GDCM (for JPEG processes pydicom cannot encode)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target.read_bytes()


def synthetic(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    modality: str = "DX",
    edit: Callable[[Dataset], None] | None = None,
) -> Dataset:
    """A minimal, valid DX/CR/CT image dataset around a 2-D (or 3-D multi-frame) array."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = pixels.tobytes()
    if edit is not None:
        edit(ds)
    return ds


def jpeg_baseline_twin(source: Dataset) -> tuple[bytes, np.ndarray]:
    """An 8-bit image re-encoded as JPEG Baseline by Pillow, and Pillow's own decode of it."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(source.pixel_array).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    twin = copy.deepcopy(source)
    twin.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    twin.PixelData = encapsulate([jpeg])
    twin["PixelData"].VR = "OB"
    twin["PixelData"].is_undefined_length = True
    reference = np.asarray(Image.open(io.BytesIO(jpeg)))
    return to_bytes(twin), reference


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))
