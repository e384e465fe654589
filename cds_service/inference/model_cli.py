"""`cxr-cds model make-tiny|fetch|info` and `cxr-cds analyze FILE`.

Progress goes to standard error; the result (text, JSON or a FHIR Bundle) to standard output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cds_service.errors import ConfigurationError
from cds_service.inference.base import TASKS, ReportRequest, write_detailed
from cds_service.inference.cxr_llava.config import MODEL_ID, MODEL_LICENCE, PINNED_REVISION
from cds_service.results import AnalysisResult, ModelInfo

FETCH_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "*.safetensors",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "README.md",
]
AI_NOTICE = (
    "AI-GENERATED, PRELIMINARY: not reviewed by a radiologist; research use only, not for "
    "clinical decisions."
)
BACKEND_CHOICES = ("cxr_llava", "hf_vlm", "tiny", "simulated")
EXIT_NOT_ANALYSED = 3


def progress(message: str) -> None:
    print(f"[cxr-cds] {message}", file=sys.stderr, flush=True)  # noqa: T201


def out(text: str) -> None:
    print(text)  # noqa: T201


# -- model make-tiny / fetch / info -------------------------------------------------------------
def cmd_make_tiny(args: argparse.Namespace) -> int:
    from cds_service.inference.cxr_llava.make_tiny import make_checkpoint

    kind = "7B-shaped (about 14 GB)" if args.full_size else "tiny"
    progress(f"writing a {kind} RANDOM checkpoint (meaningless output) to {args.dir}")
    make_checkpoint(args.dir, full_size=args.full_size, seed=args.seed)
    progress("done")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    out(f"Licence: {MODEL_LICENCE}")
    out(f"Downloading {MODEL_ID} at revision {args.revision} (safetensors, tokenizer, config).")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id=MODEL_ID,
            revision=args.revision,
            local_dir=args.dir,
            allow_patterns=FETCH_PATTERNS,
        )
    except Exception as exc:  # noqa: BLE001 - network, auth and offline errors all end here
        print(f"download failed: {type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    from cds_service.inference.cxr_llava.identity import write_fetch_marker

    write_fetch_marker(Path(path), args.revision)
    out(f"saved to {path}")
    return 0


def checkpoint_summary(folder: Path) -> dict[str, Any]:
    """Identity, parameter count and stored dtype, after verifying the tensor layout."""
    from safetensors import safe_open

    from cds_service.inference.cxr_llava.identity import checkpoint_identity, weights_sha256
    from cds_service.inference.cxr_llava.loader import inspect_checkpoint

    _config, files = inspect_checkpoint(folder)
    count = 0
    dtypes: set[str] = set()
    for file_name in sorted(set(files.values())):
        with safe_open(str(folder / file_name), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - not a Mapping
                piece = handle.get_slice(name)
                shape = piece.get_shape()
                size = 1
                for dim in shape:
                    size *= int(dim)
                count += size
                dtypes.add(str(piece.get_dtype()))
    model_id, revision, tiny = checkpoint_identity(folder)
    return {
        "model_id": model_id,
        "revision": revision,
        "tiny_random": tiny,
        "parameters": count,
        "dtype": ",".join(sorted(dtypes)),
        "sha256": weights_sha256(folder, files.values()),
        "licence": "random weights, no licence terms" if tiny else MODEL_LICENCE,
    }


def cmd_info(args: argparse.Namespace) -> int:
    summary = checkpoint_summary(Path(args.dir))
    if args.json:
        out(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        shown = f"{value:,}" if key == "parameters" else value
        out(f"{key.replace('_', ' ')}: {shown}")
    if summary["tiny_random"]:
        out("NOTE: tiny random model, meaningless output")
    return 0


# -- analyze ------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace, model_dir: str | None) -> Any:
    from cds_service.config import Settings

    public_url = os.environ.get("CXR_CDS_PUBLIC_URL", "").rstrip("/") or "http://127.0.0.1:8080"
    return Settings(backend=args.backend, model_dir=model_dir, public_url=public_url)


def _study_uid(path: Path, given: str | None) -> str:
    if given:
        return given
    digest = hashlib.sha256(path.read_bytes()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def _fhir_bundle(args: argparse.Namespace, settings: Any, result: AnalysisResult) -> Any:
    from cds_service.fhir_out.bundle import transaction_bundle
    from cds_service.fhir_out.resources import build_ai_report
    from cds_service.inference.registry import device_info

    if not args.patient:
        raise ConfigurationError("--format fhir needs --patient ID (the chart to file to)")
    study_id = "study-" + hashlib.sha256(result.study_uid.encode()).hexdigest()[:16]
    study = {
        "resourceType": "ImagingStudy",
        "id": study_id,
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{result.study_uid}"}],
        "subject": {"reference": f"Patient/{args.patient}"},
    }
    resources = build_ai_report(
        result,
        study,
        device_info(settings, result.model),
        fhir_study_reference=f"ImagingStudy/{study_id}",
        issued=datetime.now(UTC),
    )
    return transaction_bundle(resources)


def truncation_note(new_tokens: int | None) -> str:
    return (
        f"INCOMPLETE: the model's text was cut off at {new_tokens} tokens (--max-new-tokens) "
        "and may stop before it mentions a finding; findings are not coded"
    )


def _text_output(
    model: ModelInfo, task: str, text: str, notes: tuple[str, ...], cut_note: str | None
) -> str:
    lines = [AI_NOTICE, f"Model: {model.label}", f"Task: {task}"]
    if cut_note:
        lines.append(cut_note)
    if model.simulated:
        lines.append("NOTE: not a real model result (simulated or tiny random model, meaningless)")
    lines += [f"Image note: {note}" for note in notes]
    return "\n".join([*lines, "", text])


def cmd_analyze(args: argparse.Namespace) -> int:
    from cds_service.findings.to_findings import findings_from_report
    from cds_service.imaging.errors import NotAnalysable, UnsupportedImage
    from cds_service.imaging.files import read_image_file
    from cds_service.inference.registry import load_report_writer

    path = Path(args.file)
    if args.format == "fhir" and args.task != "report":
        print(  # noqa: T201
            f"--format fhir files a radiology report; --task {args.task} is not one "
            "(use --format text or json)",
            file=sys.stderr,
        )
        return 2
    if args.format == "fhir" and not args.patient:
        print("--format fhir needs --patient ID (the chart to file to)", file=sys.stderr)  # noqa: T201
        return 2
    progress(f"reading {path.name}")
    try:
        decoded = read_image_file(path, check_frontal_chest=not args.no_view_check)
        request = ReportRequest(decoded.pixels, task=args.task, question=args.question)
    except NotAnalysable as exc:
        print(f"not analysed: {exc.reason}", file=sys.stderr)  # noqa: T201
        return EXIT_NOT_ANALYSED
    except (UnsupportedImage, ValueError) as exc:
        print(f"cannot analyse {path.name}: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    with tempfile.TemporaryDirectory(prefix="cxr-cds-tiny-") as tmp:
        model_dir = args.model_dir or os.environ.get("CXR_CDS_MODEL_DIR")
        if args.backend == "tiny" and not model_dir:
            from cds_service.inference.cxr_llava.make_tiny import make_checkpoint

            progress("no --model-dir: writing a tiny random checkpoint (meaningless output)")
            model_dir = str(make_checkpoint(Path(tmp) / "tiny"))
        settings = _settings(args, model_dir)
        progress(f"loading the {args.backend} model (this can take a while)")
        overrides: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "batch_size": 1}
        if args.device:
            overrides["device"] = args.device
        writer = load_report_writer(settings, **overrides)
        progress(f"writing the {args.task} (up to {args.max_new_tokens} tokens)")
        try:
            written = write_detailed(writer, [request])[0]
        finally:
            close = getattr(writer, "close", None)
            if close is not None:
                close()
    # Only a report is coded: a differential or a free answer lists possibilities, not findings.
    text = written.text
    cut_note = truncation_note(written.new_tokens) if written.truncated else None
    if cut_note and args.format == "fhir":
        print(f"not analysed: {cut_note}; nothing to file", file=sys.stderr)  # noqa: T201
        return EXIT_NOT_ANALYSED
    coded = args.task == "report" and cut_note is None
    findings = findings_from_report(text) if coded else ()
    result = AnalysisResult(
        study_uid=_study_uid(path, args.study_uid),
        model=writer.model,
        status="completed",
        report_text=text,
        findings=findings,
        analysed_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if args.format == "json":
        payload: dict[str, Any] = {
            "notice": AI_NOTICE,
            "model": {**vars(writer.model), "label": writer.model.label},
            "task": args.task,
            "question": args.question,
            "report": text,
            "image_notes": list(decoded.notes),
        }
        payload["truncated"] = written.truncated
        if coded:
            payload["findings"] = [
                {"observation": str(f.key), "state": f.state, "evidence": f.evidence}
                for f in findings
            ]
        else:
            payload["findings_note"] = (
                cut_note if args.task == "report" else "findings are coded from --task report only"
            )
        out(json.dumps(payload, indent=2))
    elif args.format == "fhir":
        out(json.dumps(_fhir_bundle(args, settings, result), indent=2))
    else:
        out(_text_output(writer.model, args.task, text, decoded.notes, cut_note))
    return 0


def register(subparsers: Any) -> None:
    """Add `model {make-tiny,fetch,info}` and `analyze` to the cxr-cds parser."""
    model = subparsers.add_parser("model", help="model checkpoints: make-tiny, fetch, info")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser("make-tiny", help="write a random checkpoint (published layout)")
    tiny.add_argument("dir")
    tiny.add_argument("--full-size", action="store_true", help="7B-shaped, about 14 GB")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny)
    fetch = model_sub.add_parser("fetch", help=f"download {MODEL_ID} (prints the licence first)")
    fetch.add_argument("--revision", default=PINNED_REVISION)
    fetch.add_argument("--dir", default="var/models/cxr-llava-v2")
    fetch.set_defaults(func=cmd_fetch)
    info = model_sub.add_parser("info", help="model id, revision, parameters, dtype, sha256")
    info.add_argument("dir")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    analyze = subparsers.add_parser("analyze", help="one image file -> AI report (preliminary)")
    analyze.add_argument("file", help="DICOM, PNG or JPEG")
    analyze.add_argument("--task", choices=TASKS, default="report")
    analyze.add_argument("--question", help="the question for --task ask")
    analyze.add_argument("--backend", choices=BACKEND_CHOICES, default="cxr_llava")
    analyze.add_argument("--model-dir", help="checkpoint folder (default: $CXR_CDS_MODEL_DIR)")
    analyze.add_argument("--format", choices=["text", "json", "fhir"], default="text")
    analyze.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    analyze.add_argument("--max-new-tokens", type=int, default=512)
    analyze.add_argument("--patient", help="Patient id for --format fhir")
    analyze.add_argument("--study-uid", help="Study Instance UID (default: derived from the file)")
    analyze.add_argument(
        "--no-view-check", action="store_true", help="skip the frontal-chest check (DICOM)"
    )
    analyze.set_defaults(func=cmd_analyze)


def main(argv: list[str] | None = None) -> int:
    """`python -m cds_service.inference.model_cli ...`: the same commands without the rest."""
    parser = argparse.ArgumentParser(prog="cxr-cds")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
