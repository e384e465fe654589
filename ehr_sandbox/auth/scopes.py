"""SMART scopes, v1 (`.read`/`.write`/`.*`) and v2 (`.cruds`), as sets of allowed interactions."""

from __future__ import annotations

import re
from dataclasses import dataclass

SCOPE = re.compile(r"^(system|user|patient)/(\*|[A-Z][A-Za-z]+)\.(\*|read|write|c?r?u?d?s?)$")
# v1 words as v2 letters: read = read + search, write = create + update + delete.
V1_LETTERS = {"read": "rs", "write": "cud", "*": "cruds"}
# The letter each FHIR interaction needs.
INTERACTION_LETTER = {"create": "c", "read": "r", "update": "u", "delete": "d", "search": "s"}


@dataclass(frozen=True)
class ResourceScope:
    context: str  # patient, user or system
    resource_type: str  # a type name or "*"
    letters: str  # v2 letters this scope allows

    def allows(self, resource_type: str, interaction: str) -> bool:
        letter = INTERACTION_LETTER[interaction]
        return self.resource_type in ("*", resource_type) and letter in self.letters


def parse_scope(item: str) -> ResourceScope | None:
    """A resource scope, or None for anything else (`launch`, `openid`, bad text)."""
    match = SCOPE.match(item)
    if not match or not match.group(3):
        return None
    permissions = match.group(3)
    letters = V1_LETTERS.get(permissions, permissions)
    return ResourceScope(match.group(1), match.group(2), letters)


def resource_scopes(scope: str) -> list[ResourceScope]:
    return [parsed for item in scope.split() if (parsed := parse_scope(item)) is not None]


def can_write(scope: str, resource_type: str, interaction: str) -> bool:
    """True when a scope string allows `interaction` (create/update/delete) on the type."""
    return allowed_contexts(scope, resource_type, interaction) != set()


def allowed_contexts(scope: str, resource_type: str, interaction: str) -> set[str]:
    """The contexts (patient/user/system) whose scopes allow this interaction on the type."""
    return {s.context for s in resource_scopes(scope) if s.allows(resource_type, interaction)}


def grantable(requested: str, allowed: str) -> str:
    """The requested scopes the client is registered for, in request order. A registered
    resource scope also covers requests for fewer interactions (registered `.cruds` grants a
    requested `.rs`); v1 and v2 requests are both understood."""
    allowed_items = set(allowed.split())
    allowed_resources = resource_scopes(allowed)
    granted: list[str] = []
    for item in requested.split():
        wanted = parse_scope(item)
        covered = wanted is not None and any(
            have.context == wanted.context
            and have.resource_type in ("*", wanted.resource_type)
            and set(wanted.letters) <= set(have.letters)
            for have in allowed_resources
        )
        if item in allowed_items or covered:
            granted.append(item)
    return " ".join(dict.fromkeys(granted))
