"""The torch device a CXR_CDS_MODEL_DEVICE setting names, checked against this host."""

from __future__ import annotations

import torch

from cds_service.errors import ConfigurationError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; ``cuda[:N]`` must
    exist on this host (one ConfigurationError that says what to set otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigurationError(
            f"CXR_CDS_MODEL_DEVICE={name}, but this host has no usable CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): "
            "set CXR_CDS_MODEL_DEVICE=cpu or auto, or install a CUDA build of torch"
        )
    if (device.index or 0) >= torch.cuda.device_count():
        raise ConfigurationError(
            f"CXR_CDS_MODEL_DEVICE={name}, but this host has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return device
