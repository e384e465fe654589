"""Choose the backend named in the settings; the web tier only needs its ModelInfo."""

from __future__ import annotations

import logging

from cds_service.config import Settings
from cds_service.errors import ConfigurationError
from cds_service.inference.base import Backend
from cds_service.inference.simulated import SIMULATED_MODEL, SimulatedBackend
from cds_service.results import ModelInfo

log = logging.getLogger(__name__)

SIMULATED_WARNING = (
    "NO MODEL CONFIGURED: using the SIMULATED backend. Every card, report and resource is made "
    "up and marked SIMULATED. Set CXR_CDS_BACKEND and CXR_CDS_MODEL_DIR to serve a real model."
)


def model_info(settings: Settings) -> ModelInfo:
    if settings.backend == "simulated":
        return SIMULATED_MODEL
    raise ConfigurationError(
        f"backend {settings.backend!r} is not available in this release yet (model runtime issue);"
        " use CXR_CDS_BACKEND=simulated"
    )


def load_backend(settings: Settings) -> Backend:
    if settings.backend == "simulated":
        log.warning(SIMULATED_WARNING)
        return SimulatedBackend()
    model_info(settings)  # raises with the reason
    raise AssertionError("unreachable")
