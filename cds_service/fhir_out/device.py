"""The AI model as an R4 Device, and the Provenance that names it as author of a report."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from cds_service.fhir_out import codes
from cds_service.results import ModelInfo

DEVICE_TYPE_TEXT = "AI chest radiograph report generator"
SIMULATED_NOTE = (
    "SIMULATED: no AI model ran. This Device stands for the simulated backend used to wire an "
    "EHR without a GPU; nothing it authored may be used for care."
)


@dataclass(frozen=True)
class DeviceInfo:
    """The AI model as a FHIR Device: identity, version (weights hash), maker, card and licence."""

    model_id: str  # e.g. "ECOFRI/CXR-LLAVA-v2"
    version: str  # weights sha256 (ModelInfo.version)
    manufacturer: str  # e.g. "ECOFRI (model authors); served by cxr-cds"
    model_card_url: str  # e.g. https://huggingface.co/ECOFRI/CXR-LLAVA-v2
    licence_note: str  # e.g. "CC BY-NC 4.0 + Llama 2 licence; research use only, ..."
    simulated: bool = False

    def __post_init__(self) -> None:
        for name in ("model_id", "version", "manufacturer", "model_card_url", "licence_note"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"DeviceInfo.{name} must be a non-empty string, not {value!r}")
        if not self.model_card_url.startswith(("https://", "http://")):
            raise ValueError(
                f"DeviceInfo.model_card_url must be an http(s) URL: {self.model_card_url!r}"
            )

    @classmethod
    def for_model(
        cls, model: ModelInfo, *, manufacturer: str, model_card_url: str, licence_note: str
    ) -> DeviceInfo:
        return cls(
            model_id=model.model_id,
            version=model.version,
            manufacturer=manufacturer,
            model_card_url=model_card_url,
            licence_note=licence_note,
            simulated=model.simulated,
        )

    def identifier(self) -> dict[str, str]:
        """Stable per (model id, version): the Device is shared by every report of that model."""
        value = uuid.uuid5(codes.NAMESPACE, f"device\x1f{self.model_id}\x1f{self.version}")
        return {"system": codes.DEVICE_IDENTIFIER_SYSTEM, "value": str(value)}


def resource_id(identifier: dict[str, str]) -> str:
    """A deterministic resource id (uuid5 of the business identifier): same input, same id."""
    return str(uuid.uuid5(codes.NAMESPACE, f"{identifier['system']}|{identifier['value']}"))


def simulated_meta(simulated: bool, **extra: list[dict[str, Any]]) -> dict[str, Any]:
    """`meta` with the SIMULATED tag when needed; {} when there is nothing to say."""
    meta: dict[str, Any] = {key: list(value) for key, value in extra.items() if value}
    if simulated:
        meta["tag"] = [*meta.get("tag", []), codes.SIMULATED_TAG]
    return meta


def build_device(device: DeviceInfo, *, simulated: bool) -> dict[str, Any]:
    """R4 Device for the model (AI Transparency IG's AI Device: type Artificial-Intelligence)."""
    notes = [
        f"Model card: {device.model_card_url}",
        f"Licence: {device.licence_note}",
        "Output is AI-generated and preliminary; it is not reviewed by a radiologist.",
    ]
    if simulated:
        notes = [SIMULATED_NOTE, *(f"SIMULATED: {note}" for note in notes)]
    identifier = device.identifier()
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "id": resource_id(identifier),
        "identifier": [identifier],
        "status": "active",
        "manufacturer": device.manufacturer,
        "deviceName": [{"name": device.model_id, "type": "model-name"}],
        "type": {"coding": [codes.AI_DEVICE_TYPE], "text": DEVICE_TYPE_TEXT},
        "version": [{"type": {"text": "model weights version"}, "value": device.version}],
        "note": [{"text": note} for note in notes],
    }
    meta = simulated_meta(simulated)
    if meta:
        resource["meta"] = meta
    return resource


def build_provenance(
    *,
    target_references: list[str],
    device_reference: str,
    study_reference: str,
    report_identifier_value: str,
    recorded: str,
    occurred: str | None,
    simulated: bool,
) -> dict[str, Any]:
    """R4 Provenance: the Device authored the targets from the ImagingStudy (IG's AI Provenance)."""
    tag = {"system": codes.PROVENANCE_OF_REPORT_TAG_SYSTEM, "code": report_identifier_value}
    resource: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": resource_id({"system": tag["system"], "value": tag["code"]}),
        "meta": simulated_meta(simulated, tag=[tag]),
        "target": [{"reference": reference} for reference in target_references],
        "recorded": recorded,
        "activity": {"coding": [codes.DATA_OPERATION_CREATE]},
        "reason": [{"coding": [codes.AIAST]}],
        "agent": [{"type": {"coding": [codes.AUTHOR]}, "who": {"reference": device_reference}}],
        "entity": [{"role": "source", "what": {"reference": study_reference}}],
    }
    if occurred is not None:
        resource["occurredDateTime"] = occurred
    return resource
