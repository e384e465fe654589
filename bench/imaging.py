"""Benchmark: the NEMA RG1 chest film (1955 x 1841, 15-bit) in each transfer syntax.

Baseline: pydicom's plain `dcmread(...).pixel_array` (default plugin order). Ours: the same
bytes through `decode_image_bytes` (parse, limits, selection, decode of frame 0, modality/VOI
LUT, inversion, 8-bit) plus `model_input` (LANCZOS short side 512, crop, normalise). Both run
in the same process on the same bytes; the median of several runs is reported.

    .venv/bin/python bench/imaging.py [--repeat N]
"""

from __future__ import annotations

import argparse
import copy
import io
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom import dcmwrite
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from cds_service.imaging.files import decode_image_bytes
from cds_service.imaging.preprocess import model_input

MEAN, STD = 0.5518136078431373, 0.3821719215686275


def rg1(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    if path is None:
        raise SystemExit("pydicom-data is not installed (pip install -e '.[dev]')")
    return Path(path).read_bytes()


def encodings() -> dict[str, bytes]:
    original = rg1("RG1_UNCR.dcm")
    dataset = pydicom.dcmread(io.BytesIO(original))
    out = {"Explicit VR Little Endian": original}
    big = copy.deepcopy(dataset)
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    big.PixelData = dataset.pixel_array.astype(">u2").tobytes()
    buffer = io.BytesIO()
    dcmwrite(buffer, big, implicit_vr=False, little_endian=False, force_encoding=True)
    out["Explicit VR Big Endian"] = buffer.getvalue()
    for name, syntax in (("RLE Lossless", RLELossless), ("JPEG-LS Lossless", JPEGLSLossless)):
        twin = copy.deepcopy(dataset)
        twin.compress(syntax)
        buffer = io.BytesIO()
        twin.save_as(buffer, enforce_file_format=True)
        out[name] = buffer.getvalue()
    out["JPEG Lossless SV1"] = gdcm_jpeg_lossless(original)
    out["JPEG 2000 Lossless"] = rg1("RG1_J2KR.dcm")
    out["JPEG 2000 (lossy)"] = rg1("RG1_J2KI.dcm")
    return out


def gdcm_jpeg_lossless(original: bytes) -> bytes:
    import gdcm

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "in.dcm"), Path(folder, "out.dcm")
        source.write_bytes(original)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(
            gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(JPEGLosslessSV1))
        )
        change.SetInput(reader.GetImage())
        change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(target))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.Write()
        return target.read_bytes()


def median_seconds(action: Callable[[], object], repeat: int) -> float:
    action()  # warm-up (imports, plugin discovery)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"# RG1 imaging benchmark ({platform.machine()}, commit {commit}, median of {args.repeat})"
    )
    print(
        "| transfer syntax | pydicom pixel_array (ms) | ours: decode+8-bit (ms) | "
        "ours: +model input (ms) | ratio |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, data in encodings().items():
        baseline = median_seconds(
            lambda d=data: pydicom.dcmread(io.BytesIO(d)).pixel_array, args.repeat
        )
        decoded = median_seconds(lambda d=data: decode_image_bytes(d), args.repeat)
        full = median_seconds(
            lambda d=data: model_input(decode_image_bytes(d).pixels, MEAN, STD), args.repeat
        )
        print(
            f"| {name} | {baseline * 1000:.0f} | {decoded * 1000:.0f} | {full * 1000:.0f} | "
            f"{full / baseline:.2f} |"
        )


if __name__ == "__main__":
    main()
