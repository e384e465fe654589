"""The composition root: the service's long-lived parts, built from the settings in one place.

`serve`, `worker`, `demo`, the SMART app, the benchmarks and the tests all start here, so
each process builds its storage, its access to EHRs and its model description one way. Parts
are made when first used: nothing opens a database before gunicorn forks, and a command that
needs no model never loads one.

Storage adapters (`cds_service.storage.ports`): SQLite (``CXR_CDS_DB``, the embedded
deployment) or PostgreSQL (``CXR_CDS_DATABASE_URL``); queue: workers polling the database, or
Celery wake-ups over Redis (``CXR_CDS_QUEUE=celery``, `cds_service.jobs.celery_queue`).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING

from cds_service.config import Settings
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.storage.ports import Storage

if TYPE_CHECKING:
    from cds_service.hooks import HookHandler
    from cds_service.inference.base import Backend
    from cds_service.jobs.arrivals import Arrivals
    from cds_service.jobs.celery_queue import Wakeups
    from cds_service.jobs.filing import ReportFiler
    from cds_service.results import ModelInfo
    from cds_service.security.client_jwt import ClientJwtVerifier


def open_storage(settings: Settings) -> Storage:
    """Every storage port, on the database the settings name: PostgreSQL when
    CXR_CDS_DATABASE_URL is set, else the SQLite file CXR_CDS_DB."""
    if settings.database_url:
        from cds_service.storage.postgres import open_postgres_storage

        return open_postgres_storage(settings.database_url)
    from cds_service.storage.sqlite import open_sqlite_storage

    return open_sqlite_storage(settings.database)


class Composition:
    """One process's parts. ``storage`` replaces the one the settings name (tests and
    benchmarks that share a database between parts)."""

    def __init__(self, settings: Settings, *, storage: Storage | None = None) -> None:
        self.settings = settings
        self._given_storage = storage

    @cached_property
    def storage(self) -> Storage:
        """The storage ports; with CXR_CDS_QUEUE=celery, the job queue also wakes a worker
        over Redis for every job it makes claimable."""
        storage = self._given_storage or open_storage(self.settings)
        if self.settings.queue == "celery":
            from cds_service.jobs.celery_queue import WakingJobQueue

            storage = replace(storage, jobs=WakingJobQueue(storage.jobs, self.wakeups))
        return storage

    @cached_property
    def wakeups(self) -> Wakeups:
        """Publishes Celery wake-ups (CXR_CDS_QUEUE=celery only)."""
        from cds_service.jobs.celery_queue import Wakeups, celery_app, time_slice_s

        if self.settings.redis_url is None:
            raise ValueError("CXR_CDS_QUEUE=celery needs CXR_CDS_REDIS_URL")
        return Wakeups(celery_app(self.settings.redis_url, time_slice_s(self.settings.job_lease_s)))

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

        return HookHandler(self.settings, self.storage, self.model, access=self.access)

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

    def run_worker(self, stop: threading.Event) -> None:
        """The inference worker of these settings, until stopped: claims from the database
        in the embedded queue, or a Celery worker (CXR_CDS_QUEUE=celery; stops on SIGTERM)."""
        backend = self.backend()
        filer = self.report_filer(backend.model)
        if self.settings.queue == "celery":
            from cds_service.jobs.celery_queue import run_celery_worker

            assert self.settings.redis_url is not None  # validated with the settings
            run_celery_worker(
                self.storage,
                backend,
                filer,
                self.settings.redis_url,
                self.settings.model_batch_size,
                self.settings.job_lease_s,
            )
            return
        from cds_service.jobs.worker import run_forever

        run_forever(
            self.storage,
            backend,
            stop,
            filer=filer,
            batch_size=self.settings.model_batch_size,
            lease_s=self.settings.job_lease_s,
        )

    def report_filer(self, model: ModelInfo) -> ReportFiler | None:
        """Files reports of ``model`` into the registered EHRs (None: no EHR registered)."""
        from cds_service.inference.registry import device_info
        from cds_service.jobs.filing import ReportFiler

        if not self.settings.ehr_clients:
            return None
        return ReportFiler(self.access, device_info(self.settings, model))
