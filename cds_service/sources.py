"""Data sources: results belong to the EHR that holds the study, not to whoever asked.

A data source is named by its canonical FHIR base. Two callers configured for the same EHR
(the sandbox's own CDS client and the public CDS Hooks sandbox pointed at it) therefore share
one set of results, and a study is analysed once however many triggers name it. A caller that
names no FHIR server is its own data source (its issuer stands in for the base).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_fhir_base(url: str) -> str:
    """One spelling per FHIR base: lower-case scheme and host, no default port, no trailing
    '/', no query or fragment. The path keeps its case (servers may treat it as significant).
    A value that is not an absolute URL (a development tenant) is returned unchanged."""
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.netloc:
        return url.strip().rstrip("/")
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number: leave it for the caller's own validation to reject
        return url.strip().rstrip("/")
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = f"{parts.netloc.rsplit('@', 1)[0]}@{netloc}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", ""))


def same_fhir_base(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and canonical_fhir_base(a) == canonical_fhir_base(b)


def data_source(fhir_server: str | None, issuer: str) -> str:
    """The data source of a request: its vetted FHIR server, or else the caller's issuer."""
    return canonical_fhir_base(fhir_server if fhir_server else issuer)
