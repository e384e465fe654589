"""CXR_CDS_MODEL_* settings are read and checked."""

from __future__ import annotations

import pytest

from cds_service.config import Settings
from cds_service.errors import ConfigurationError
from cds_service.inference.registry import runtime_options


def test_model_settings_are_read_and_checked() -> None:
    env = {"CXR_CDS_MODE": "development", "CXR_CDS_PUBLIC_URL": "http://localhost:1",
           "CXR_CDS_MODEL_DEVICE": "cuda:1", "CXR_CDS_MAX_NEW_TOKENS": "128",
           "CXR_CDS_MODEL_BATCH_SIZE": "16", "CXR_CDS_MODEL_TIMEOUT": "30"}  # fmt: skip
    settings = Settings.from_env(env)
    assert (settings.model_device, settings.max_new_tokens) == ("cuda:1", 128)
    assert (settings.model_batch_size, settings.model_timeout_s) == (16, 30.0)
    assert runtime_options(settings)["batch_size"] == 16
    with pytest.raises(ConfigurationError, match="MODEL_DEVICE"):
        Settings.from_env({**env, "CXR_CDS_MODEL_DEVICE": "tpu"})
    with pytest.raises(ConfigurationError, match="MAX_NEW_TOKENS"):
        Settings.from_env({**env, "CXR_CDS_MAX_NEW_TOKENS": "0"})


def test_cxr_cds_offers_the_model_commands() -> None:
    from cds_service.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["analyze", "x.png", "--backend", "tiny", "--format", "fhir"])
    assert (args.backend, args.format, args.task) == ("tiny", "fhir", "report")
    assert parser.parse_args(["model", "make-tiny", "d", "--full-size"]).full_size
    assert parser.parse_args(["model", "fetch"]).revision == (
        "b2224786bb90d54b1e1291171866706cfbb44e2b"
    )
