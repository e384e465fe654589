"""Choose the backend named in the settings; the web tier only needs its ModelInfo."""

from __future__ import annotations

import logging

from cds_service.config import Settings
from cds_service.errors import ConfigurationError
from cds_service.fhir_out.resources import DeviceInfo
from cds_service.inference.base import Backend
from cds_service.inference.simulated import SIMULATED_MODEL, SimulatedBackend
from cds_service.results import ModelInfo

log = logging.getLogger(__name__)

MODEL_LICENCE = (
    "CXR-LLaVA v2 weights: CC BY-NC 4.0 plus the Llama 2 licence; research use only, "
    "not for clinical decisions."
)
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


def device_info(settings: Settings, model: ModelInfo) -> DeviceInfo:
    """The model as a FHIR Device. The model card page is served by the service itself."""
    if model.simulated:
        return DeviceInfo.for_model(
            model,
            manufacturer="cxr-cds simulated backend (no AI model)",
            model_card_url=f"{settings.public_url}/model-card",
            licence_note="No model weights: made-up output for integration testing only.",
        )
    return DeviceInfo.for_model(
        model,
        manufacturer="ECOFRI (model authors); served by cxr-cds",
        model_card_url="https://huggingface.co/ECOFRI/CXR-LLAVA-v2",
        licence_note=MODEL_LICENCE,
    )


def load_backend(settings: Settings) -> Backend:
    if settings.backend == "simulated":
        log.warning(SIMULATED_WARNING)
        return SimulatedBackend()
    model_info(settings)  # raises with the reason
    raise AssertionError("unreachable")
