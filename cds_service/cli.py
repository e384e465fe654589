"""The `cxr-cds` command: serve, worker, sandbox, hook, demo."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cds_service.errors import ConfigurationError
from cds_service.imaging.cli import register as register_dicom_commands
from cds_service.inference.model_cli import register as register_model_commands
from cds_service.inference.registry import SIMULATED_WARNING, check_model_settings
from cds_service.observability.logs import configure_logging

if TYPE_CHECKING:
    from cds_service.config import Settings

log = logging.getLogger("cxr_cds")

ORDER_CODE_SYSTEMS = (
    (re.compile(r"^\d{3,5}-\d$"), "http://loinc.org"),
    (re.compile(r"^\d{5}$"), "http://www.ama-assn.org/go/cpt"),
    (re.compile(r"^\d{6,18}$"), "http://snomed.info/sct"),
)
DEFAULT_ORDER_DISPLAY = "XR Chest 2 Views"


def _order_system(code: str) -> str:
    for pattern, system in ORDER_CODE_SYSTEMS:
        if pattern.match(code):
            return system
    raise SystemExit(f"--order-code {code!r}: give a LOINC (36643-5), CPT (71046) or SNOMED code")


# -- serve / worker -------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from cds_service.config import Settings
    from cds_service.observability.multiproc import default_multiprocess_dir, use_multiprocess_dir

    settings = Settings.from_env()
    configure_logging(settings)
    # Before anything imports prometheus_client: the gunicorn workers and the inference worker
    # started below each write their metrics there, and /metrics adds them up.
    use_multiprocess_dir(default_multiprocess_dir(settings.database))
    from cds_service.web.gunicorn_app import run_gunicorn

    check_model_settings(settings)
    warn_missing_access(settings)
    threading.Thread(target=resume_arrivals, args=(settings,), daemon=True).start()
    if settings.simulated:
        log.warning(SIMULATED_WARNING)
    supervisor = None
    if not args.no_worker:
        from cds_service.jobs.supervisor import WorkerSupervisor

        # A separate process (not multiprocessing): gunicorn forks its workers after this.
        supervisor = WorkerSupervisor(on_exit=lambda message: record_exit(settings, message))
        supervisor.start()
    try:
        run_gunicorn(settings, bind=f"{args.host}:{args.port}", workers=args.workers)
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def record_exit(settings: Settings, message: str) -> None:
    """What the supervisor saw, for /readyz (opened here, in the supervisor's thread: no
    database connection is made before gunicorn forks)."""
    from cds_service.composition import Composition

    parts = Composition(settings)
    parts.storage.workers.record_exit(parts.model.label, message)


def resume_arrivals(settings: Settings) -> None:
    """For each EHR that notifies this service: resume its Subscriptions that stopped on
    refused notifications, and queue the films that changed since the cursor. Runs in a
    thread of its own at start (an EHR may be slow or down); says what it did."""
    from cds_service.composition import Composition
    from cds_service.jobs.arrivals import NOTIFICATIONS_PATH, resume_subscriptions

    parts = Composition(settings)
    endpoint = settings.public_url + NOTIFICATIONS_PATH
    for ehr in settings.ehr_clients:
        if not ehr.notification_token:
            continue
        try:
            done = resume_subscriptions(parts.arrivals, ehr, endpoint)
        except Exception as exc:  # noqa: BLE001 - start-up goes on; the watcher still works
            log.warning(
                "could not check the Subscriptions at %s (%s): new films may not arrive; "
                "see `cxr-cds subscribe` and `cxr-cds watch`",
                ehr.fhir_base,
                type(exc).__name__,
            )
            continue
        for name in done.resumed:
            log.warning("%s at %s had stopped on errors: asked to resume", name, ehr.fhir_base)
        if not done.resumed and not done.active:
            log.warning(
                "no Subscription of this service at %s: run `cxr-cds subscribe --fhir %s` "
                "so that new films arrive",
                ehr.fhir_base,
                ehr.fhir_base,
            )
        if done.caught_up is not None and done.caught_up.arrivals:
            queued = sum(a.outcome == "queued" for a in done.caught_up.arrivals)
            log.info("caught up at %s: %d studies queued", ehr.fhir_base, queued)


def warn_missing_access(settings: Settings) -> None:
    """One warning per trusted FHIR base whose studies the worker could not read."""
    for base in settings.fhir_bases_without_access():
        log.warning(
            "no access to %s: its studies will wait; register it in CXR_CDS_EHR_CLIENTS "
            "(a SMART Backend Services client) so the worker can read them",
            base,
        )


def cmd_worker(args: argparse.Namespace) -> int:
    from cds_service.composition import Composition
    from cds_service.config import Settings

    settings = Settings.from_env()
    configure_logging(settings)
    check_model_settings(settings)
    stop = threading.Event()
    try:
        Composition(settings).run_worker(stop)
    except KeyboardInterrupt:
        stop.set()
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    from cds_service.composition import Composition
    from cds_service.config import Settings

    settings = Settings.from_env()
    if not settings.database.exists():
        print(f"error: no database at {settings.database} (set CXR_CDS_DB)", file=sys.stderr)
        return 2
    parts = Composition(settings)
    store, model = parts.storage, parts.model
    statuses = ("not-analysed", "failed") if args.state == "any" else (args.state,)
    count = store.jobs.requeue(
        model,
        study_uid=args.study,
        statuses=statuses,
        reason=args.reason,
        fhir_server=args.fhir,
        dry_run=args.dry_run,
    )
    released = 0 if args.dry_run or not args.waiting else store.jobs.release_waiting()
    verb = "would be queued again" if args.dry_run else "queued again"
    print(f"{count} stud{'y' if count == 1 else 'ies'} {verb} for {model.label}")
    if args.waiting and not args.dry_run:
        print(f"{released} waiting job{'' if released == 1 else 's'} released")
    return 0


# -- sandbox ------------------------------------------------------------------------------
def cmd_sandbox(args: argparse.Namespace) -> int:
    from werkzeug.serving import make_server

    from ehr_sandbox.app import Sandbox, SandboxSettings, create_app
    from ehr_sandbox.seed import seed

    base = f"http://{args.host}:{args.port}"
    # URLs follow each request's base (a proxy such as the SMART launcher rewrites them).
    sandbox = Sandbox.open(SandboxSettings(data_dir=Path(args.data_dir), address=base))
    if not args.no_seed:
        seed(sandbox.store)
    server = make_server(args.host, args.port, create_app(sandbox=sandbox), threaded=True)
    print(f"EHR sandbox FHIR R4 base: {base}/fhir")
    print(f"CDS client JWKS:          {base}/.well-known/jwks.json (kid {sandbox.key.kid})")
    if not args.no_service_registration:
        from ehr_sandbox.service_registration import register_service

        files = register_service(sandbox, base)
        print("The CDS service is registered as a Backend Services client. Start it with")
        print("(8080: the service's port; change both numbers if it runs elsewhere):")
        print("    CXR_CDS_MODE=demo CXR_CDS_PUBLIC_URL=http://127.0.0.1:8080 \\")
        print(f"    CXR_CDS_TRUSTED_ISSUERS={files.trusted_issuers} \\")
        print(f"    CXR_CDS_EHR_CLIENTS={files.ehr_clients} \\")
        print("    .venv/bin/cxr-cds serve --port 8080")
        print("then, with the same settings, subscribe it to new films:")
        print(f"    .venv/bin/cxr-cds subscribe --fhir {base}/fhir")
    server.serve_forever()
    return 0


def cmd_sandbox_film(args: argparse.Namespace) -> int:
    import requests

    from ehr_sandbox.films import DEFAULT_FILM, add_film

    if not (Path(args.sandbox_dir) / "ehr.sqlite3").exists():
        print(
            f"error: no EHR sandbox data in {args.sandbox_dir} (give its --data-dir with "
            "--sandbox-dir)",
            file=sys.stderr,
        )
        return 2
    try:
        reference = add_film(
            args.sandbox, Path(args.sandbox_dir), args.patient, Path(args.file or DEFAULT_FILM)
        )
    except requests.RequestException:
        print(
            f"error: cannot reach the EHR sandbox at {args.sandbox} (is it running? "
            "name it with --sandbox URL)",
            file=sys.stderr,
        )
        return 2
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{reference} created for Patient/{args.patient} (its Subscriptions are notified)")
    return 0


# -- hook -----------------------------------------------------------------------------------
def cmd_hook(args: argparse.Namespace) -> int:
    from ehr_sandbox.cds_client import (
        CdsClientError,
        CdsHooksClient,
        SigningKey,
        draft_imaging_order,
        format_cards,
        hook_context,
    )

    key = SigningKey.load_or_create(args.key)
    fhir = args.fhir.rstrip("/") if args.fhir else None
    issuer = args.iss or (fhir.rsplit("/fhir", 1)[0] if fhir else "urn:cxr-cds:cli")
    order = None
    if args.hook != "patient-view":
        code = args.order_code or "36643-5"
        order = draft_imaging_order(args.patient, code, _order_system(code), args.order_text)
    context = hook_context(args.hook, args.patient, args.user, order)
    authorization = None
    token = args.access_token
    if token is None and args.sandbox_dir and fhir:
        from ehr_sandbox.access_tokens import TokenStore
        from ehr_sandbox.app import SANDBOX_CLIENT_ID, SandboxSettings

        sandbox_settings = SandboxSettings(data_dir=Path(args.sandbox_dir))
        if sandbox_settings.database.exists():
            token = (
                TokenStore(sandbox_settings.database)
                .issue(
                    SANDBOX_CLIENT_ID, "patient/ImagingStudy.rs patient/Patient.rs", args.patient
                )
                .token
            )
    if token and fhir:
        authorization = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/ImagingStudy.rs patient/Patient.rs",
            "subject": "cxr-cds-hook-cli",
            "patient": args.patient,
        }
    client = CdsHooksClient(issuer, key, jku=args.jku)
    try:
        calls = client.fire(
            args.service,
            args.hook,
            context,
            fhir,
            authorization,
            with_prefetch=not args.no_prefetch,
        )
    except CdsClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not calls:
        print(f"error: {args.service} offers no service for {args.hook}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                [{"url": c.service_url, "status": c.status, "response": c.response} for c in calls],
                indent=2,
            )
        )
    else:
        for call in calls:
            print(format_cards(call))
    return 0 if all(c.status == 200 for c in calls) else 1


# -- findings -------------------------------------------------------------------------------
FINDINGS_EPILOG = """\
one report: the text on standard input, e.g. cxr-cds findings --all < report.txt

batch (CheXpert labeler format, stanfordmlgroup/chexpert-labeler):
  cxr-cds findings --csv reports.csv -o labeled.csv
      reports.csv has no header; each row's first field is one report (other fields are
      ignored, blank lines skipped). labeled.csv has the header
      Reports,No Finding,Enlarged Cardiomediastinum,...,Support Devices
      and per report its text, then 1 (positive), 0 (negative), -1 (uncertain) or blank
      (not mentioned) per observation. An empty report gets a row of blanks.
  cxr-cds findings --csv reports.csv --column report_text --id-column study_id -o labeled.csv
      the first row is a header: the report is the column named by --column; --id-column
      carries that column into the output, first, under its own name (other columns are
      dropped: join back on the id).
  cxr-cds findings --jsonl reports.jsonl --id-column id -o labeled.jsonl
      one JSON object a line with the report in "text" (or the field --column names), or
      one JSON string a line; writes {"id", "text", "labels": {observation: positive |
      negative | uncertain | not_mentioned}} per line (all 14; "id" with --id-column),
      the layout of tests/data/labeler/eval.jsonl. --output-format csv|jsonl converts.

FILE - reads standard input; no -o (or -o -) writes standard output. The summary goes to
standard error. Input is UTF-8 (a byte-order mark is allowed). Bad input is a one-line error
naming the line, exit status 2; an output file is written under a temporary name and only
renamed into place when complete."""


def cmd_findings(args: argparse.Namespace) -> int:
    if args.csv is not None or args.jsonl is not None:
        return _findings_batch(args)
    batch_only = ("column", "id_column", "output", "output_format")
    given = [f"--{o.replace('_', '-')}" for o in batch_only if getattr(args, o) is not None]
    if args.jobs != 1:
        given.append("--jobs")
    if given:
        print(f"error: {', '.join(given)}: only with --csv FILE or --jsonl FILE", file=sys.stderr)
        return 2

    from cds_service.findings.labeler import label_report, labels_as_json
    from cds_service.findings.observations import Label

    text = sys.stdin.read()
    if not text.strip():
        print("error: give the report text on standard input", file=sys.stderr)
        return 2
    labels = label_report(text)
    if args.json:
        print(json.dumps(labels_as_json(labels), indent=2))
        return 0
    for observation, label in labels.items():
        if label.label is Label.NOT_MENTIONED and not args.all:
            continue
        print(f"{observation.value:28} {label.label.value:13} {label.sentence or ''}")
    return 0


def _findings_batch(args: argparse.Namespace) -> int:
    import os

    from cds_service.findings.batch import BatchError, Format, Source, label_file

    if args.json or args.all:
        print("error: --json and --all are for one report on standard input", file=sys.stderr)
        return 2
    if args.jobs < 0:
        print("error: --jobs N: N processes, 0 for every CPU", file=sys.stderr)
        return 2
    input_format: Format = "csv" if args.csv is not None else "jsonl"
    if input_format == "csv" and args.id_column is not None and args.column is None:
        print(
            "error: --id-column needs --column: a header row names the report and id columns",
            file=sys.stderr,
        )
        return 2
    path = args.csv if args.csv is not None else args.jsonl
    source: Source = sys.stdin.buffer if path == "-" else path
    name = "standard input" if path == "-" else path
    to_stdout = args.output in (None, "-")

    def progress(count: int) -> None:
        print(f"... {count} reports", file=sys.stderr, flush=True)

    try:
        summary = label_file(
            source,
            sys.stdout if to_stdout else args.output,
            input_format=input_format,
            output_format=args.output_format,
            column=args.column,
            id_column=args.id_column,
            jobs=args.jobs,
            name=name,
            progress=progress,
        )
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as a Unix filter does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    empty = f" ({summary.empty} empty)" if summary.empty else ""
    where = "standard output" if to_stdout else args.output
    print(
        f"{summary.reports} report{'s' if summary.reports != 1 else ''} labelled{empty} "
        f"in {summary.seconds:.1f} s -> {where}",
        file=sys.stderr,
    )
    return 0


# -- feedback -------------------------------------------------------------------------------
def cmd_feedback_export(args: argparse.Namespace) -> int:
    import os

    from cds_service.composition import open_storage
    from cds_service.config import Settings
    from cds_service.jobs.feedback_export import export_csv

    path = Path(args.db or os.environ.get("CXR_CDS_DB", "var/cxr-cds.sqlite3"))
    if not path.exists():
        print(f"error: no database at {path} (set --db or CXR_CDS_DB)", file=sys.stderr)
        return 2
    feedback = open_storage(Settings(database=path)).feedback
    if args.output:
        with open(args.output, "w", newline="", encoding="utf-8") as handle:
            count = export_csv(feedback, handle)
        print(f"{count} feedback rows written to {args.output}", file=sys.stderr)
    else:
        export_csv(feedback, sys.stdout)
    return 0


# -- demo -----------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    import os

    from cds_service.web.demo import run_demo

    configure_logging(os.environ.get("CXR_CDS_LOG_FORMAT", "text").strip().lower())

    return run_demo(
        host=args.host,
        service_port=args.port,
        sandbox_port=args.sandbox_port,
        data_dir=Path(args.data_dir),
        keep_running=not args.once,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-cds", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the CDS service (gunicorn) and an inference worker")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--no-worker", action="store_true", help="web tier only")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run the inference worker alone")
    worker.set_defaults(func=cmd_worker)

    sandbox = sub.add_parser("sandbox", help="run the EHR sandbox (FHIR R4 + CDS client JWKS)")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8081)
    sandbox.add_argument("--data-dir", default="var/sandbox")
    sandbox.add_argument("--no-seed", action="store_true")
    sandbox.add_argument(
        "--no-service-registration",
        action="store_true",
        help="do not register the CDS service as a Backend Services client (writes its "
        "settings files under DATA_DIR/cds-service otherwise)",
    )
    sandbox.set_defaults(func=cmd_sandbox)

    film = sub.add_parser(
        "sandbox-film",
        help="a new chest film arrives in the running EHR sandbox (Binary + ImagingStudy + Media)",
    )
    film.add_argument(
        "--sandbox",
        default="http://127.0.0.1:8081",
        help="the sandbox's base URL (default: %(default)s)",
    )
    film.add_argument(
        "--sandbox-dir", default="var/sandbox", help="its --data-dir (default: %(default)s)"
    )
    film.add_argument("--patient", default="cxr-demo-1")
    film.add_argument("--file", help="a DICOM file (default: a seeded frontal chest film)")
    film.set_defaults(func=cmd_sandbox_film)

    hook = sub.add_parser("hook", help="fire a CDS hook at any CDS service, as an EHR would")
    hook.add_argument(
        "--service", required=True, help="CDS service base URL (before /cds-services)"
    )
    hook.add_argument(
        "--hook", required=True, choices=["patient-view", "order-select", "order-sign"]
    )
    hook.add_argument("--patient", required=True, help="Patient id")
    hook.add_argument("--fhir", help="FHIR base URL sent as fhirServer and used for prefetch")
    hook.add_argument("--order-code", help="draft order code: LOINC, CPT or SNOMED CT")
    hook.add_argument("--order-text", default=DEFAULT_ORDER_DISPLAY)
    hook.add_argument("--user", default="Practitioner/example")
    hook.add_argument("--iss", help="JWT issuer (default: the sandbox base URL)")
    hook.add_argument("--jku", help="jku header to put in the JWT")
    hook.add_argument("--key", default="var/sandbox/cds-client-key.jwk.json", help="ES384 JWK file")
    hook.add_argument("--access-token", help="FHIR access token sent in fhirAuthorization")
    hook.add_argument(
        "--sandbox-dir",
        default="var/sandbox",
        help="mint an access token from this local sandbox when none is given",
    )
    hook.add_argument("--no-prefetch", action="store_true")
    hook.add_argument("--json", action="store_true")
    hook.set_defaults(func=cmd_hook)

    requeue = sub.add_parser(
        "requeue",
        help="analyse again studies whose result is 'not analysed' or 'failed' (operators)",
        description="Analyse again the studies whose stored result for the configured model "
        "is 'not analysed' or 'failed' (completed results are never redone: that would file "
        "a second report). Filters combine.",
    )
    requeue.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    requeue.add_argument(
        "--state", choices=["not-analysed", "failed", "any"], default="any", help="default: any"
    )
    requeue.add_argument("--reason", metavar="TEXT", help="only results whose reason contains TEXT")
    requeue.add_argument("--fhir", metavar="URL", help="only studies from this FHIR base")
    requeue.add_argument(
        "--waiting", action="store_true", help="also release jobs waiting for access now"
    )
    requeue.add_argument("--dry-run", action="store_true", help="count, change nothing")
    requeue.set_defaults(func=cmd_requeue)

    from cds_service.jobs.cli import add_parsers as add_trigger_parsers

    add_trigger_parsers(sub)  # watch, analyze-study, subscribe

    findings = sub.add_parser(
        "findings",
        help="label a report from standard input, or a CSV / JSON Lines file of reports",
        description="Label radiology reports: the 14 CheXpert observations.",
        epilog=FINDINGS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    findings.add_argument("--json", action="store_true", help="all 14 observations as JSON")
    findings.add_argument("--all", action="store_true", help="also list not mentioned ones")
    batch_input = findings.add_mutually_exclusive_group()
    batch_input.add_argument(
        "--csv", metavar="FILE", help="label every report of a CSV file (CheXpert format)"
    )
    batch_input.add_argument(
        "--jsonl", metavar="FILE", help="label every report of a JSON Lines file"
    )
    findings.add_argument(
        "--column",
        metavar="NAME",
        help="CSV: the first row is a header and NAME the report column; "
        'JSON Lines: the report field (default "text")',
    )
    findings.add_argument(
        "--id-column", metavar="NAME", help="carry this column / field into the output"
    )
    findings.add_argument(
        "-o", "--output", metavar="FILE", help="file to write (default or -: standard output)"
    )
    findings.add_argument(
        "--output-format", choices=["csv", "jsonl"], help="default: the input's format"
    )
    findings.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="label in N processes, output in input order (0: every CPU; default 1)",
    )
    findings.set_defaults(func=cmd_findings)

    feedback = sub.add_parser("feedback", help="clinicians' feedback on cards")
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True)
    export = feedback_sub.add_parser("export", help="one row per feedback item with its finding")
    export.add_argument("--format", choices=["csv"], default="csv")
    export.add_argument("--db", help="the service's SQLite file (default: $CXR_CDS_DB)")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    export.set_defaults(func=cmd_feedback_export)

    demo = sub.add_parser("demo", help="sandbox + service + a patient-view hook, end to end")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--sandbox-port", type=int, default=8081)
    demo.add_argument("--data-dir", default="var/demo")
    demo.add_argument("--once", action="store_true", help="exit after printing the cards")
    demo.set_defaults(func=cmd_demo)
    register_model_commands(sub)
    register_dicom_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Text until a command reads CXR_CDS_LOG_FORMAT (serve, worker, demo).
    configure_logging("text", logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
