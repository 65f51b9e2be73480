"""Assemble the self-contained page: the template with the stylesheet, the script and the data inline."""

from __future__ import annotations

import html
import importlib.resources
import json
import re

_PLACEHOLDER = re.compile(r"\{\{(TITLE|CSS|JS|DATA)\}\}")


def _asset(name: str) -> str:
    return (importlib.resources.files(__package__) / name).read_text(encoding="utf-8")


def data_json(data: dict) -> str:
    """JSON that is safe inside ``<script>``: ``<`` and ``/`` escaped (no ``</script>``, no literal URLs)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace("/", "\\/")


def render_page(data: dict) -> str:
    """The HTML page for ``data`` (see ``build.build_view_data``), placeholders filled in one pass."""
    parts = {
        "TITLE": html.escape(data["title"]),
        "CSS": _asset("viewer.css"),
        "JS": _asset("viewer.js"),
        "DATA": data_json(data),
    }
    return _PLACEHOLDER.sub(lambda match: parts[match.group(1)], _asset("page.html"))
