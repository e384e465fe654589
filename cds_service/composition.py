"""The composition root: the service's long-lived parts, built from the settings in one place.

`serve`, `worker`, `demo`, the SMART app, the benchmarks and the tests all start here, so
each process builds its storage, its access to EHRs and its model description one way. Parts
are made when first used: nothing opens a database before gunicorn forks, and a command that
needs no model never loads one.

Storage adapters: SQLite (``CXR_CDS_DB``, the embedded deployment) today; the scale-out
issue adds PostgreSQL behind the same ports (`cds_service.storage.ports`).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from cds_service.config import Settings
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.storage.ports import Storage

if TYPE_CHECKING:
    from cds_service.hooks import HookHandler
    from cds_service.inference.base import Backend
    from cds_service.jobs.arrivals import Arrivals
    from cds_service.jobs.filing import ReportFiler
    from cds_service.results import ModelInfo
    from cds_service.security.client_jwt import ClientJwtVerifier


def open_storage(settings: Settings) -> Storage:
    """Every storage port, on the database the settings name."""
    from cds_service.storage.sqlite import open_sqlite_storage

    return open_sqlite_storage(settings.database)


class Composition:
    """One process's parts. ``storage`` replaces the one the settings name (tests and
    benchmarks that share a database between parts)."""

    def __init__(self, settings: Settings, *, storage: Storage | None = None) -> None:
        self.settings = settings
        if storage is not None:
            self.__dict__["storage"] = storage  # what cached_property would have stored

    @cached_property
    def storage(self) -> Storage:
        return open_storage(self.settings)

    @cached_property
    def access(self) -> BackendServicesClients:
        """The service's own access to each registered EHR (one token cache per EHR)."""
        return BackendServicesClients(self.settings.ehr_clients)

    @cached_property
    def model(self) -> ModelInfo:
        """The configured model's id and version (reads no weights beyond their hash)."""
        from cds_service.inference.registry import model_info

        return model_info(self.settings)

    @cached_property
    def arrivals(self) -> Arrivals:
        from cds_service.jobs.arrivals import Arrivals

        return Arrivals(self.storage, self.model, self.access)

    @cached_property
    def hook_handler(self) -> HookHandler:
        from cds_service.hooks import HookHandler

        return HookHandler(self.settings, self.storage, self.model)

    @cached_property
    def jwt_verifier(self) -> ClientJwtVerifier | None:
        """The hook callers' JWT check (None when authentication is off)."""
        from cds_service.security.client_jwt import ClientJwtVerifier

        if not self.settings.auth_enabled:
            return None
        return ClientJwtVerifier(
            self.settings.accepted_issuers(),
            self.storage.replay,
            leeway_s=self.settings.jwt_leeway_s,
        )

    def backend(self) -> Backend:
        """The worker's study pipeline with the configured model (loads the weights)."""
        from cds_service.inference.registry import load_backend

        return load_backend(self.settings, self.access)

    def report_filer(self, model: ModelInfo) -> ReportFiler | None:
        """Files reports of ``model`` into the registered EHRs (None: no EHR registered)."""
        from cds_service.inference.registry import device_info
        from cds_service.jobs.filing import ReportFiler

        if not self.settings.ehr_clients:
            return None
        return ReportFiler(self.access, device_info(self.settings, model))
