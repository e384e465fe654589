"""Why an image could not be used: unreadable (UnsupportedImage) or not for this model
(NotAnalysable, with a short reason shown as "not analysed: <reason>", never as a finding)."""

from __future__ import annotations

from cds_service.errors import CdsServiceError


class ImagingError(CdsServiceError):
    """Root of the imaging errors; the description is safe to show (no PHI, no stack)."""

    status = 422
    code = "imaging-error"


class UnsupportedImage(ImagingError):
    """The bytes cannot be read safely: corrupt, truncated, too big, unknown encoding."""

    code = "unsupported-image"


class NotAnalysable(ImagingError):
    """A readable image the model was not trained for: lateral view, CT, not a chest."""

    code = "not-analysable"

    def __init__(self, reason: str) -> None:
        super().__init__(f"not analysed: {reason}")
        self.reason = reason


class ImageFetchError(ImagingError):
    """The image server could not be reached or answered badly: worth retrying later."""

    status = 502
    code = "image-fetch-failed"


class NoAccess(ImagingError):
    """The worker has no registered access to the EHR that holds the study, so its images
    were never looked for. Not a fact about the study: the job waits and is tried again once
    access is configured; it is never stored as "not analysed"."""

    status = 503
    code = "no-access"

    def __init__(self, fhir_server: str | None) -> None:
        if fhir_server:
            message = (
                f"no access to {fhir_server}: register it in CXR_CDS_EHR_CLIENTS (a SMART "
                "Backend Services client) so the worker can read its studies and images"
            )
        else:
            message = (
                "the study came with no FHIR server to read it from, and no image server "
                "holds it: the worker cannot look for its images"
            )
        super().__init__(message)
        self.fhir_server = fhir_server

    @staticmethod
    def explains(reason: str) -> bool:
        """Whether a waiting job's reason is this (not, say, a pause before a retry)."""
        return reason.startswith(("no access to ", "the study came with no FHIR server"))
