"""The SMART app's routes. Minimal until the SMART app issue: it acknowledges the launch."""

from __future__ import annotations

from html import escape

from flask import Blueprint, Response, request

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>AI chest X-ray viewer</title></head>
<body>
<h1>AI chest X-ray viewer</h1>
<p><strong>Not available yet in this release.</strong> The launch reached the app, but the
SMART authorization and study viewer are not built yet, so no patient data is shown.</p>
<dl><dt>iss</dt><dd>{iss}</dd><dt>launch</dt><dd>{launch}</dd></dl>
</body></html>
"""


def create_smart_blueprint() -> Blueprint:
    bp = Blueprint("smart_app", __name__)

    @bp.get("/launch")
    def launch() -> Response:
        body = PAGE.format(
            iss=escape(request.args.get("iss", "(none)")),
            launch=escape("given" if request.args.get("launch") else "(none)"),
        )
        response = Response(body, mimetype="text/html")
        response.headers["Content-Security-Policy"] = "default-src 'none'"
        return response

    return bp
