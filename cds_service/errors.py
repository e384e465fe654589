"""One error hierarchy for the service; each leaf maps to an HTTP status and a short code."""

from __future__ import annotations


class CdsServiceError(Exception):
    """Root of every error the service turns into an HTTP answer."""

    status = 500
    code = "internal-error"

    def __init__(self, description: str = "") -> None:
        super().__init__(description or self.code)
        self.description = description or self.code


class BadRequest(CdsServiceError):
    status = 400
    code = "bad-request"


class Unauthorized(CdsServiceError):
    """Authentication failed. The caller sees no detail (CDS Hooks security section)."""

    status = 401
    code = "unauthorized"


class Forbidden(CdsServiceError):
    """Authenticated, but this caller may not do that (e.g. name a FHIR server it is not
    configured for)."""

    status = 403
    code = "forbidden"


class Conflict(CdsServiceError):
    status = 409
    code = "conflict"


class NotFound(CdsServiceError):
    status = 404
    code = "not-found"


class PreconditionFailed(CdsServiceError):
    """Required FHIR data could be neither prefetched nor fetched (CDS Hooks 2.0, 412)."""

    status = 412
    code = "precondition-failed"


class PayloadTooLarge(CdsServiceError):
    status = 413
    code = "payload-too-large"


class UnprocessableEntity(CdsServiceError):
    status = 422
    code = "unprocessable-entity"


class ServiceUnavailable(CdsServiceError):
    status = 503
    code = "service-unavailable"


class ConfigurationError(Exception):
    """Settings that are missing, malformed or unsafe for the chosen mode."""
