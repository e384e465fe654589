"""Export clinicians' card feedback, joined with the finding each card stated, as CSV."""

from __future__ import annotations

import csv
import json
from typing import TextIO

from cds_service.fhir.shapes import as_dict, as_str
from cds_service.fhir_out.cards import OVERRIDE_REASONS
from cds_service.storage.ports import FeedbackLog

COLUMNS = (
    "received_at",
    "service_id",
    "card_uuid",
    "source",
    "study_uid",
    "finding",
    "ai_state",
    "model_id",
    "model_version",
    "outcome",
    "override_reason_code",
    "override_reason_display",
    "user_comment",
    "outcome_timestamp",
)


def _cell(value: object) -> str:
    """Caller-supplied text as a spreadsheet cell: never read as a formula (CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def offered_display(reason: dict[str, object]) -> str | None:
    """The display of an override reason the service offered, found by its code (and system,
    when the feedback names one): EHRs such as the CDS Hooks sandbox send the code alone."""
    code, system = as_str(reason.get("code")), as_str(reason.get("system"))
    for offered in OVERRIDE_REASONS:
        if offered["code"] == code and system in (None, offered["system"]):
            return offered["display"]
    return None


def export_csv(feedback: FeedbackLog, out: TextIO) -> int:
    """Write one row per feedback item; returns the number of rows. No patient identifiers."""
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    count = 0
    for row in feedback.feedback_rows():
        item = json.loads(row["body"])
        override = as_dict(item.get("overrideReason"))
        reason = as_dict(override.get("reason"))
        writer.writerow(
            {
                **row,
                "override_reason_code": _cell(reason.get("code")),
                "override_reason_display": _cell(
                    as_str(reason.get("display")) or offered_display(reason)
                ),
                "user_comment": _cell(override.get("userComment")),
                "outcome_timestamp": _cell(item.get("outcomeTimestamp")),
            }
        )
        count += 1
    return count
