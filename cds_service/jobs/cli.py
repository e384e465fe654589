"""Operator commands that start analyses: `cxr-cds watch` (poll a FHIR server for new chest
films), `cxr-cds analyze-study` (one study) and `cxr-cds subscribe` (ask the EHR for FHIR
Subscription notifications). All use the service's own registered access to the EHR."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Any

from cds_service.config import Settings
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.fhir.client import FhirError
from cds_service.jobs.arrivals import (
    NOTIFICATIONS_PATH,
    Arrivals,
    NoSourceAccess,
    Poll,
    subscribe,
)
from cds_service.sources import canonical_fhir_base

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0


def _arrivals(settings: Settings, max_pages: int = 5) -> Arrivals:
    from cds_service.composition import Composition

    parts = Composition(settings)
    return Arrivals(parts.storage, parts.model, parts.access, max_pages=max_pages)


def _summary(poll: Poll) -> str:
    queued = sum(a.outcome == "queued" for a in poll.arrivals)
    other = len(poll.arrivals) - queued
    more = "" if poll.complete else " (more remain)"
    return (
        f"{len(poll.arrivals)} changed studies: {queued} queued, {other} known or not chest{more}"
    )


def watch(
    arrivals: Arrivals,
    fhir_base: str,
    *,
    interval_s: float,
    stop: threading.Event,
    once: bool = False,
) -> int:
    """Poll until stopped. A failed poll backs off (doubling, at most 5 min) and never moves
    the cursor, so nothing is skipped; a page-limited poll is followed at once by the next."""
    delay = interval_s
    while not stop.is_set():
        try:
            poll = arrivals.poll(fhir_base)
        except NoSourceAccess as exc:
            print(f"configuration error: {exc}", file=sys.stderr)
            return 2
        except FhirError as exc:
            log.warning("watch %s: poll failed (%s); retrying in %.0f s", fhir_base, exc, delay)
            if once:
                return 1
            stop.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
            continue
        delay = interval_s
        print(_summary(poll), flush=True)
        if once and poll.complete:
            return 0
        if poll.complete:
            stop.wait(interval_s)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    arrivals = _arrivals(settings, args.max_pages)
    base = canonical_fhir_base(args.fhir)
    if args.since:
        arrivals.storage.cursors.set_watch_cursor(base, args.since)
    cursor = arrivals.storage.cursors.watch_cursor(base)
    print(f"watching {base} for new chest films (cursor {cursor})")
    stop = threading.Event()
    try:
        return watch(arrivals, base, interval_s=args.interval, stop=stop, once=args.once)
    except KeyboardInterrupt:
        stop.set()
        return 0


def cmd_analyze_study(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    arrivals = _arrivals(settings)
    reference = args.study if "/" in args.study else f"ImagingStudy/{args.study}"
    try:
        arrival = arrivals.study(args.fhir, reference)
    except NoSourceAccess as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except (FhirError, ValueError) as exc:
        print(f"error: cannot read {reference} from {args.fhir}: {exc}", file=sys.stderr)
        return 2
    if not arrival.accepted or arrival.ref is None:
        print(f"not queued: {arrival.outcome.replace('-', ' ')}")
        return 1
    job_id = arrivals.storage.jobs.latest_job_id(arrival.ref, arrivals.model)
    state = "queued" if arrival.outcome == "queued" else "already queued or analysed"
    print(f"{reference}: {state} for {arrivals.model.label} (analysis {job_id})")
    return 0


def cmd_subscribe(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    base = canonical_fhir_base(args.fhir)
    ehr = BackendServicesClients(settings.ehr_clients).registration(base)
    if ehr is None or not ehr.notification_token:
        print(
            f"configuration error: {base} needs a CXR_CDS_EHR_CLIENTS entry with a "
            "notification_token_file (the secret its notifications will send)",
            file=sys.stderr,
        )
        return 2
    if not settings.public_url:
        print("configuration error: set CXR_CDS_PUBLIC_URL (the EHR posts to it)", file=sys.stderr)
        return 2
    endpoint = settings.public_url + NOTIFICATIONS_PATH
    arrivals = _arrivals(settings)
    try:
        created = subscribe(arrivals, ehr, endpoint, criteria=args.criteria, payload=args.payload)
    except FhirError as exc:
        print(f"error: the EHR did not accept the Subscription: {exc}", file=sys.stderr)
        return 2
    print(
        f"Subscription/{created.get('id')} ({created.get('status')}): {args.criteria} -> {endpoint}"
    )
    return 0


def add_parsers(sub: Any) -> None:
    watch_parser = sub.add_parser(
        "watch",
        help="poll a FHIR server for new or changed chest films and queue them",
        description="Search ImagingStudy by _lastUpdated from a cursor kept in the database "
        "(restarts resume where they stopped), at most --max-pages pages per poll, and queue "
        "each chest radiograph once. Uses the server's CXR_CDS_EHR_CLIENTS registration.",
    )
    watch_parser.add_argument("--fhir", required=True, metavar="URL", help="FHIR base")
    watch_parser.add_argument("--interval", type=float, default=30.0, help="seconds (default 30)")
    watch_parser.add_argument("--max-pages", type=int, default=5, help="per poll (default 5)")
    watch_parser.add_argument("--since", metavar="INSTANT", help="start the cursor here")
    watch_parser.add_argument("--once", action="store_true", help="poll until caught up, exit")
    watch_parser.set_defaults(func=cmd_watch)

    analyze = sub.add_parser(
        "analyze-study",
        help="queue the analysis of one study (read with the service's registered access)",
    )
    analyze.add_argument("--fhir", required=True, metavar="URL", help="FHIR base")
    analyze.add_argument(
        "--study", required=True, metavar="ID", help="ImagingStudy id or reference"
    )
    analyze.set_defaults(func=cmd_analyze_study)

    subscribe = sub.add_parser(
        "subscribe",
        help="create an R4 rest-hook Subscription in the EHR for new chest films",
        description="POST a Subscription (channel.header carries the EHR's notification "
        "token) to the EHR with the service's Backend Services registration. Notifications "
        "go to $CXR_CDS_PUBLIC_URL/fhir-notifications.",
    )
    subscribe.add_argument("--fhir", required=True, metavar="URL", help="FHIR base")
    subscribe.add_argument("--criteria", default="ImagingStudy", help="default: ImagingStudy")
    subscribe.add_argument(
        "--payload", choices=["id-only", "empty", "full-resource"], default="id-only"
    )
    subscribe.set_defaults(func=cmd_subscribe)


__all__ = ["add_parsers", "watch"]
