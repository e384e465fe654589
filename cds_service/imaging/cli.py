"""`cxr-cds dicom inspect FILE [--json]` and `cxr-cds dicom render FILE -o OUT.png
[--model-input]`: what the imaging layer sees in a file, and the exact image the model gets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from cds_service.imaging import decode, selection
from cds_service.imaging.errors import ImagingError
from cds_service.imaging.files import is_dicom, read_image_file
from cds_service.imaging.limits import DEFAULT_LIMITS
from cds_service.imaging.preprocess import resize_and_crop
from cds_service.imaging.render import png_bytes

# Tags that decide how the pixels are read and whether the model may see them. No patient
# identity is printed.
_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PresentationIntentType",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PresentationLUTShape",
)


def _plain(value: Any) -> Any:
    if isinstance(value, str | int | float) or value is None:
        return value
    try:
        return [_plain(v) for v in value] if not isinstance(value, bytes) else None
    except TypeError:
        return str(value)


def _tag_values(dataset: Dataset) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for keyword in _TAGS:
        try:
            value = dataset.get(keyword)
        except Exception:  # noqa: BLE001 - a malformed tag is shown as unreadable
            value = "<unreadable>"
        if value is not None and value != "":
            values[keyword] = _plain(value) if not isinstance(value, float | int) else value
    try:
        values["TransferSyntax"] = UID(str(dataset.file_meta.TransferSyntaxUID)).name
        values["SOPClass"] = UID(str(dataset.get("SOPClassUID", ""))).name
    except Exception:  # noqa: BLE001
        values["TransferSyntax"] = "<unreadable>"
    if "VOILUTSequence" in dataset:
        values["VOILUTSequence"] = f"{len(dataset.VOILUTSequence)} LUT(s)"
    return values


def inspect_file(path: Path) -> dict[str, Any]:
    """Tags, the frontal-chest decision and the pixel pipeline's notes (or its error)."""
    report: dict[str, Any] = {"file": path.name}
    data = path.read_bytes()
    if is_dicom(data):
        try:
            dataset = decode.read_dataset(data, DEFAULT_LIMITS)
        except ImagingError as exc:
            report["error"] = exc.description
            return report
        report["tags"] = _tag_values(dataset)
        report["decision"] = selection.select_dataset(dataset).to_json()
    try:
        decoded = read_image_file(path, check_frontal_chest=False)
    except ImagingError as exc:
        report["error"] = exc.description
        return report
    report.setdefault("decision", decoded.selection.to_json())
    report["image"] = {
        "rows": int(decoded.pixels.shape[0]),
        "columns": int(decoded.pixels.shape[1]),
        "notes": list(decoded.notes),
    }
    return report


def _print_text(report: dict[str, Any]) -> None:
    print(f"file: {report['file']}")
    for key, value in report.get("tags", {}).items():
        print(f"  {key}: {value}")
    decision = report.get("decision")
    if decision:
        verdict = "analysable" if decision["analysable"] else "not analysed"
        print(f"decision: {verdict}: {decision['reason']}")
    if "image" in report:
        image = report["image"]
        print(f"8-bit image: {image['rows']} x {image['columns']}")
        for note in image["notes"]:
            print(f"  - {note}")
    if "error" in report:
        print(f"error: {report['error']}")


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"no such file: {path}", file=sys.stderr)
        return 2
    report = inspect_file(path)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_text(report)
    return 1 if "error" in report else 0


def cmd_render(args: argparse.Namespace) -> int:
    try:
        decoded = read_image_file(args.file, check_frontal_chest=False)
    except ImagingError as exc:
        print(f"cannot render {Path(args.file).name}: {exc.description}", file=sys.stderr)
        return 1
    pixels = resize_and_crop(decoded.pixels) if args.model_input else decoded.pixels
    Path(args.output).write_bytes(png_bytes(pixels))
    if not decoded.selection.analysable:
        print(f"warning: the service would not analyse this image: {decoded.selection.reason}")
    print(f"wrote {args.output} ({pixels.shape[0]} x {pixels.shape[1]}, 8-bit grayscale)")
    return 0


def register(subparsers: Any) -> None:
    """Add `dicom inspect` and `dicom render` to the cxr-cds parser."""
    dicom = subparsers.add_parser("dicom", help="inspect DICOM files and render the model's view")
    commands = dicom.add_subparsers(dest="dicom_command", required=True)
    inspect = commands.add_parser(
        "inspect", help="tags that matter, the frontal-chest decision and pipeline notes"
    )
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=cmd_inspect)
    render = commands.add_parser(
        "render", help="write the exact 8-bit image the model sees (before resize) as PNG"
    )
    render.add_argument("file")
    render.add_argument("-o", "--output", required=True, help="PNG file to write")
    render.add_argument(
        "--model-input", action="store_true", help="write the 512 x 512 crop the model gets"
    )
    render.set_defaults(func=cmd_render)
