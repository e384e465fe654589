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
