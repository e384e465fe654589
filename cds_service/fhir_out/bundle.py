"""The write-back transaction Bundle: conditional creates, so a repeated analysis adds nothing.

FHIR R4 http.html#transaction: entries reference each other by `fullUrl` (urn:uuid), and the
server rewrites those references to the ids it assigns; `ifNoneExist` makes each POST a
conditional create. When a search matches, the server keeps the existing resource and points
the other entries' references at it, so writing the same analysis twice leaves one of each.

Provenance has no `identifier` in R4. Rather than create a second Provenance on every retry,
or make the caller look first, it carries a tag whose code is the report identifier value and
is created on `_tag=<system>|<code>` (`_tag` is a search parameter of every R4 resource).
"""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import quote

from cds_service.fhir_out import codes
from cds_service.fhir_out.checks import check_resource
from cds_service.fhir_out.resources import AiReportResources


def _token(system: str, value: str) -> str:
    # A query-string value: percent-encode anything outside the characters a URL allows there.
    return f"{quote(system, safe=':/')}|{quote(value, safe=':/')}"


def if_none_exist(resource: dict[str, Any]) -> str:
    """The conditional-create search for one of our resources."""
    if resource["resourceType"] == "Provenance":
        tags = [
            tag
            for tag in resource["meta"]["tag"]
            if tag["system"] == codes.PROVENANCE_OF_REPORT_TAG_SYSTEM
        ]
        return f"_tag={_token(tags[0]['system'], tags[0]['code'])}"
    identifier = resource["identifier"][0]
    return f"identifier={_token(identifier['system'], identifier['value'])}"


def _rewrite(node: Any, urls: dict[str, str]) -> Any:
    """A copy of `node` with every Reference.reference to a bundled resource made its fullUrl."""
    if isinstance(node, list):
        return [_rewrite(item, urls) for item in node]
    if isinstance(node, dict):
        out = {key: _rewrite(value, urls) for key, value in node.items()}
        reference = out.get("reference")
        if isinstance(reference, str) and reference in urls:
            out["reference"] = urls[reference]
        return out
    return node


def transaction_bundle(resources: AiReportResources) -> dict[str, Any]:
    """A `transaction` Bundle that POSTs every resource with `ifNoneExist` (pure, deterministic)."""
    members = resources.all()
    urls = {f"{r['resourceType']}/{r['id']}": f"urn:uuid:{r['id']}" for r in members}
    entries = []
    for resource in members:
        body = _rewrite(copy.deepcopy(resource), urls)
        # POST: the server assigns the id (R4 http.html#create); the fullUrl stands for it.
        del body["id"]
        entries.append(
            {
                "fullUrl": urls[f"{resource['resourceType']}/{resource['id']}"],
                "resource": body,
                "request": {
                    "method": "POST",
                    "url": resource["resourceType"],
                    "ifNoneExist": if_none_exist(resource),
                },
            }
        )
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    check_resource(bundle)
    return bundle
