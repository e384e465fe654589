"""The app's side of SMART App Launch 2.x: discovery, the authorization URL (PKCE S256,
`aud` = `iss`), the code exchange and token refresh, with authlib's OAuth2 client."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import requests
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2 import OAuth2Error

TIMEOUT = (3.0, 10.0)
VERIFIER_BYTES = 48  # 64 characters, within RFC 7636's 43..128


class SmartError(Exception):
    """The EHR's SMART endpoints could not be used; the text is safe to show to a user."""


@dataclass(frozen=True)
class SmartConfiguration:
    authorization_endpoint: str
    token_endpoint: str
    capabilities: tuple[str, ...]


def discover(iss: str, session: requests.Session | None = None) -> SmartConfiguration:
    """Read `{iss}/.well-known/smart-configuration`; refuse servers without PKCE S256."""
    url = f"{iss.rstrip('/')}/.well-known/smart-configuration"
    http = session or requests.Session()
    try:
        response = http.get(
            url, headers={"Accept": "application/json"}, timeout=TIMEOUT, allow_redirects=False
        )
        body = response.json() if response.status_code == 200 else None
    except (requests.RequestException, ValueError):
        body = None
    if not isinstance(body, dict):
        raise SmartError("the EHR's SMART configuration could not be read")
    authorize, token = body.get("authorization_endpoint"), body.get("token_endpoint")
    if not (isinstance(authorize, str) and isinstance(token, str)):
        raise SmartError("the EHR's SMART configuration names no authorization/token endpoint")
    for endpoint in (authorize, token):
        if not endpoint.startswith(("https://", "http://")):
            raise SmartError("the EHR's SMART endpoints are not http(s) URLs")
    if "S256" not in (body.get("code_challenge_methods_supported") or []):
        raise SmartError("the EHR does not offer PKCE with S256; refusing to launch")
    capabilities = body.get("capabilities")
    return SmartConfiguration(
        authorization_endpoint=authorize,
        token_endpoint=token,
        capabilities=tuple(c for c in capabilities if isinstance(c, str))
        if isinstance(capabilities, list)
        else (),
    )


def new_code_verifier() -> str:
    return secrets.token_urlsafe(VERIFIER_BYTES)


def _client(client_id: str, redirect_uri: str, scope: str | None = None) -> OAuth2Session:
    return OAuth2Session(
        client_id=client_id,
        redirect_uri=redirect_uri,
        scope=scope,
        token_endpoint_auth_method="none",  # noqa: S106  (public client: PKCE, no secret)
        code_challenge_method="S256",
        default_timeout=TIMEOUT,
    )


def authorization_url(
    config: SmartConfiguration,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str,
    state: str,
    code_verifier: str,
    iss: str,
    launch: str | None,
) -> str:
    extra: dict[str, str] = {"aud": iss}
    if launch:
        extra["launch"] = launch
    url, _ = _client(client_id, redirect_uri, scope).create_authorization_url(
        config.authorization_endpoint, state=state, code_verifier=code_verifier, **extra
    )
    return str(url)


def _token_call(call: Any) -> dict[str, Any]:
    try:
        token = call()
    except (OAuth2Error, OAuthError) as exc:
        raise SmartError(f"the EHR refused the token request ({exc.error})") from None
    except (requests.RequestException, ValueError):
        raise SmartError("the EHR's token endpoint could not be reached") from None
    if not isinstance(token, dict) or not token.get("access_token"):
        raise SmartError("the EHR's token answer has no access token")
    if str(token.get("token_type", "")).lower() != "bearer":
        raise SmartError("the EHR issued a token that is not a bearer token")
    return dict(token)


def exchange_code(
    *, token_endpoint: str, client_id: str, redirect_uri: str, code: str, code_verifier: str
) -> dict[str, Any]:
    client = _client(client_id, redirect_uri)
    return _token_call(
        lambda: client.fetch_token(
            token_endpoint,
            grant_type="authorization_code",
            code=code,
            code_verifier=code_verifier,
            redirect_uri=redirect_uri,
            allow_redirects=False,
        )
    )


def refresh(*, token_endpoint: str, client_id: str, refresh_token: str) -> dict[str, Any]:
    client = _client(client_id, "")
    return _token_call(
        lambda: client.refresh_token(
            token_endpoint, refresh_token=refresh_token, allow_redirects=False
        )
    )
