"""Comparing secrets (tokens, CSRF values) without revealing by timing how much matched."""

from __future__ import annotations

import hmac


def same_secret(expected: str, given: str) -> bool:
    """Constant-time comparison that also accepts non-ASCII input (from a form or URL)."""
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))
