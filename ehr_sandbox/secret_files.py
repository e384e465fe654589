"""Secrets the sandbox keeps in its data directory, made once and shared by every process
(gunicorn workers) that opens the same directory."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

FORM_SECRET_BYTES = 32


def load_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    """The file's content; when it does not exist yet, `make()` is written there (mode 0600).
    The file appears complete or not at all (a finished temporary file is hard-linked into
    place), so processes starting together all read the same secret."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(make())
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first: theirs
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    return path.read_bytes()


def form_secret(path: Path) -> bytes:
    """The key that signs the sandbox's sign-in forms (CSRF tokens)."""
    secret = load_or_create(path, lambda: secrets.token_bytes(FORM_SECRET_BYTES))
    if len(secret) < FORM_SECRET_BYTES:
        raise ValueError(
            f"{path} holds {len(secret)} bytes, fewer than {FORM_SECRET_BYTES}: delete it and "
            "the sandbox makes a new one"
        )
    return secret
