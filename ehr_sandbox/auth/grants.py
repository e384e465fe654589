"""authlib pieces of the sandbox's SMART authorization server: the public-client model, the
authorization code grant with PKCE S256 enforced (`plain` refused), and refresh tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, ClientMixin, grants
from authlib.oauth2.rfc6749.errors import InvalidRequestError, InvalidScopeError
from authlib.oauth2.rfc7636 import CodeChallenge

from ehr_sandbox.access_tokens import TokenStore
from ehr_sandbox.auth.scopes import grantable
from ehr_sandbox.auth.smart_store import (
    CODE_LIFETIME_S,
    AuthorizationCode,
    LaunchContext,
    RefreshToken,
    SmartApp,
    SmartStore,
)

USER_TOKEN_LIFETIME_S = 3600
REFRESH_SCOPES = frozenset({"offline_access", "online_access"})


@dataclass(frozen=True)
class Approval:
    """What the user (or the EHR launch) approved: the launch context and granted scopes."""

    context: LaunchContext
    scope: str


class SmartClient(ClientMixin):
    """A registered public SMART app: no secret, PKCE instead, exact redirect URIs."""

    def __init__(self, app: SmartApp) -> None:
        self.app = app
        self.client_id = app.client_id

    def get_client_id(self) -> str:
        return self.app.client_id

    def get_default_redirect_uri(self) -> str:
        return self.app.redirect_uris[0]

    def get_allowed_scope(self, scope: str) -> str:
        return grantable(scope, self.app.scope)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.app.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


class CodeRecord(AuthorizationCodeMixin):
    def __init__(self, code: AuthorizationCode) -> None:
        self.record = code
        self.code_challenge = code.challenge
        self.code_challenge_method = code.challenge_method

    def get_redirect_uri(self) -> str:
        return self.record.redirect_uri

    def get_scope(self) -> str:
        return self.record.scope


class RefreshCredential:
    def __init__(self, record: RefreshToken) -> None:
        self.record = record

    def check_client(self, client: SmartClient) -> bool:
        return client.client_id == self.record.client_id

    def get_scope(self) -> str:
        return self.record.scope


class S256Only(CodeChallenge):
    """PKCE is mandatory for every authorization request, and only with S256."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge (S256)")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256; plain is refused")
        super().validate_code_challenge(grant, redirect_uri)


def _store(grant: Any) -> SmartStore:
    return grant.server.smart_store


class SmartAuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

    def save_authorization_code(self, code: str, request: Any) -> None:
        approval: Approval = request.user
        data = request.payload.data
        _store(self).save_code(
            AuthorizationCode(
                code=code,
                client_id=request.client.get_client_id(),
                redirect_uri=request.payload.redirect_uri or "",
                scope=approval.scope,
                challenge=str(data.get("code_challenge")),
                challenge_method=str(data.get("code_challenge_method")),
                context=approval.context,
                expires_at=time.time() + CODE_LIFETIME_S,
                used=False,
            )
        )

    def query_authorization_code(self, code: str, client: SmartClient) -> CodeRecord | None:
        record = _store(self).code(code)
        if record is None or record.client_id != client.client_id:
            return None
        if record.expires_at < time.time():
            return None
        if not _store(self).use_code(code):
            # A replayed code: refused, and what it was exchanged for is revoked (RFC 6749
            # section 4.1.2), since the code has leaked.
            for issued in _store(self).issued_for(code):
                _store(self).revoke_refresh_token(issued)
                self.server.token_store.revoke(issued)
            return None
        return CodeRecord(record)

    def delete_authorization_code(self, authorization_code: CodeRecord) -> None:
        """Nothing to do: the code was marked used when it was looked up."""

    def authenticate_user(self, authorization_code: CodeRecord) -> Approval:
        return Approval(authorization_code.record.context, authorization_code.record.scope)


class SmartRefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshCredential | None:
        record = _store(self).refresh_token(refresh_token)
        if record is None or record.revoked or record.expires_at < time.time():
            return None
        if record.client_id != self.request.client.client_id:
            return None  # authlib answers invalid_grant; the token stays usable by its client
        requested = str(self.request.payload.scope or "").split()
        if not set(requested) <= set(record.scope.split()):
            # Refused before the token is used up (authlib checks the scope only afterwards):
            # a client that asks for too much keeps its refresh token.
            raise InvalidScopeError()
        # Used up now, atomically: two concurrent uses of one refresh token cannot both win.
        return RefreshCredential(record) if _store(self).use_refresh_token(refresh_token) else None

    def authenticate_user(self, credential: RefreshCredential) -> Approval:
        return Approval(credential.record.context, credential.record.scope)

    def revoke_old_credential(self, credential: RefreshCredential) -> None:
        """Nothing left to do: the refresh token was revoked when it was looked up."""


def save_token(
    token: dict[str, Any],
    client: SmartClient,
    approval: Approval,
    tokens: TokenStore,
    smart: SmartStore,
    code: str | None = None,
) -> None:
    """Persist what authlib generated and add the SMART launch context to the response."""
    scope = str(token.get("scope") or approval.scope)
    token["scope"] = scope
    tokens.save(
        str(token["access_token"]),
        client.client_id,
        scope,
        approval.context.patient,
        int(token.get("expires_in") or USER_TOKEN_LIFETIME_S),
    )
    refresh = token.pop("refresh_token", None)
    if refresh and REFRESH_SCOPES & set(scope.split()):
        smart.save_refresh_token(str(refresh), client.client_id, scope, approval.context)
        token["refresh_token"] = refresh
    token.update(approval.context.token_fields())
    if code is not None:
        smart.record_issued(
            code, [str(token["access_token"]), *([str(refresh)] if refresh else [])]
        )
