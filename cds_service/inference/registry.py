"""Choose the backend named in the settings; the web tier only needs its ModelInfo."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cds_service.config import Settings
from cds_service.errors import ConfigurationError
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.fhir_out.resources import DeviceInfo
from cds_service.imaging.limits import ImageLimits
from cds_service.imaging.study import study_images_for
from cds_service.inference.base import Backend, ReportWriter
from cds_service.inference.cxr_llava.config import MODEL_LICENCE
from cds_service.inference.cxr_llava.identity import UNVERIFIED_MODEL_ID
from cds_service.inference.pipeline import ImagePipelineBackend
from cds_service.inference.simulated import SIMULATED_MODEL
from cds_service.results import ModelInfo

log = logging.getLogger(__name__)


SIMULATED_WARNING = (
    "NO MODEL CONFIGURED: using the SIMULATED backend. Every card, report and resource is made "
    "up and marked SIMULATED. Set CXR_CDS_BACKEND and CXR_CDS_MODEL_DIR to serve a real model."
)


TINY_LABEL = "tiny-random-cxr-llava-meaningless"


def _model_folder(settings: Settings) -> Path:
    if not settings.model_dir:
        hint = (
            "make one with `cxr-cds model make-tiny DIR`"
            if settings.backend == "tiny"
            else "download one with `cxr-cds model fetch`"
        )
        raise ConfigurationError(f"backend {settings.backend!r} needs CXR_CDS_MODEL_DIR ({hint})")
    folder = Path(settings.model_dir)
    if not folder.is_dir():
        raise ConfigurationError(f"CXR_CDS_MODEL_DIR {folder} is not a folder")
    return folder


def check_model_settings(settings: Settings) -> None:
    """Refuse, with one ConfigurationError, model settings that cannot work on this host:
    a missing model folder, or a CUDA device the host does not have. Checked before the web
    tier or the worker starts, so a bad setting is one clear line, not a worker restarting
    forever or a traceback in every gunicorn worker."""
    if settings.backend == "simulated":
        return
    _model_folder(settings)
    if settings.model_device.startswith("cuda"):
        from cds_service.inference.device import pick_device  # imports torch: only here

        pick_device(settings.model_device)


def model_info(settings: Settings) -> ModelInfo:
    """Which model the settings name, without loading it (the weights' sha256 is cached).

    Version = the first 12 hex digits of a sha256 over the weight files.
    """
    if settings.backend == "simulated":
        return SIMULATED_MODEL
    from cds_service.inference.cxr_llava.identity import checkpoint_identity, weights_version

    folder = _model_folder(settings)
    version = weights_version(folder)
    if settings.backend == "hf_vlm":
        from cds_service.inference.hf_vlm import hf_model_id

        return ModelInfo(model_id=hf_model_id(folder), version=version)
    model_id, _revision, tiny = checkpoint_identity(folder)
    if tiny or settings.backend == "tiny":
        return ModelInfo(model_id=TINY_LABEL, version=version, simulated=True)
    return ModelInfo(model_id=model_id, version=version)


def runtime_options(settings: Settings) -> dict[str, Any]:
    """CXR_CDS_MODEL_DEVICE, CXR_CDS_MAX_NEW_TOKENS, CXR_CDS_MODEL_BATCH_SIZE, _MODEL_TIMEOUT."""
    return {
        "device": settings.model_device,
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.model_batch_size,
        "timeout_s": settings.model_timeout_s,
    }


def load_report_writer(settings: Settings, **overrides: Any) -> ReportWriter:
    """The ReportWriter the settings name; models are loaded onto their device now.

    `overrides` replace runtime options (device, max_new_tokens, batch_size, timeout_s).
    """
    options = {**runtime_options(settings), **overrides}
    if settings.backend == "simulated":
        from cds_service.inference.simulated import SimulatedReportWriter

        log.warning(SIMULATED_WARNING)
        return SimulatedReportWriter()
    folder = _model_folder(settings)
    if settings.backend == "hf_vlm":
        from cds_service.inference.hf_vlm import HfVlmReportWriter

        log.warning("loading %s: check its licence before use", folder)
        return HfVlmReportWriter.from_folder(
            folder, device=options["device"], max_new_tokens=options["max_new_tokens"]
        )
    from cds_service.inference.cxr_llava.loader import load_checkpoint
    from cds_service.inference.cxr_llava.writer import CxrLlavaReportWriter

    if settings.backend == "cxr_llava":
        log.warning(MODEL_LICENCE)
    ckpt = load_checkpoint(folder, device=options["device"])
    if settings.backend == "tiny":
        ckpt.tiny = True
    return CxrLlavaReportWriter(
        ckpt,
        max_new_tokens=options["max_new_tokens"],
        max_batch_size=options["batch_size"],
        timeout_s=options["timeout_s"],
    )


def device_info(settings: Settings, model: ModelInfo) -> DeviceInfo:
    """The model as a FHIR Device. The model card page is served by the service itself."""
    if model.simulated and model.model_id == TINY_LABEL:
        return DeviceInfo.for_model(
            model,
            manufacturer="cxr-cds tiny random model (random weights, meaningless output)",
            model_card_url=f"{settings.public_url}/model-card",
            licence_note="Random weights made by cxr-cds model make-tiny: for testing only.",
        )
    if model.simulated:
        return DeviceInfo.for_model(
            model,
            manufacturer="cxr-cds simulated backend (no AI model)",
            model_card_url=f"{settings.public_url}/model-card",
            licence_note="No model weights: made-up output for integration testing only.",
        )
    if model.model_id == UNVERIFIED_MODEL_ID:
        return DeviceInfo.for_model(
            model,
            manufacturer="unknown: a local checkpoint in the CXR-LLaVA v2 layout, not verified "
            "as the published ECOFRI/CXR-LLAVA-v2 weights; served by cxr-cds",
            model_card_url=f"{settings.public_url}/model-card",
            licence_note="Provenance not verified. If these are (derived from) the published "
            f"weights: {MODEL_LICENCE}",
        )
    return DeviceInfo.for_model(
        model,
        manufacturer="ECOFRI (model authors); served by cxr-cds",
        model_card_url="https://huggingface.co/ECOFRI/CXR-LLAVA-v2",
        licence_note=MODEL_LICENCE,
    )


def load_backend(settings: Settings, access: BackendServicesClients) -> Backend:
    """The worker's backend: fetch and select the study's frontal chest image (from the EHRs
    the service is registered with, through ``access``, and the image servers), then the
    configured model writes the report. Even the simulated model only ever 'reports' on a
    real, selected image."""
    limits = ImageLimits(max_bytes=settings.image_max_bytes, max_pixels=settings.image_max_pixels)
    images = study_images_for(access, settings.image_servers, limits)
    return ImagePipelineBackend(load_report_writer(settings), images, limits)
