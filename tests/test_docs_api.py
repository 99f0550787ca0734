"""docs/api.md documents every endpoint of the management API, each with a curl example."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flask_llmauth.api import API_ROUTES

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_every_management_endpoint_is_documented_with_a_curl_example(app_factory: Any) -> None:
    app = app_factory(routes=False)  # registers the blueprint, which fills API_ROUTES
    text = DOC.read_text(encoding="utf-8")
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    documented: dict[tuple[str, str], str] = {}
    for section in sections:
        heading = section.splitlines()[0]
        for method, path in re.findall(r"`(GET|POST) ([^`?]+)", heading):
            documented[(method, path.replace("{key}", "{key_id}"))] = section
    missing, no_example = [], []
    for rule in app.url_map.iter_rules():
        path = API_ROUTES.get(rule.endpoint)
        if path is None:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            if (method, path) not in documented:
                missing.append(f"{method} {path}")
            elif "curl " not in documented[(method, path)]:
                no_example.append(f"{method} {path}")
    assert not missing, f"endpoints missing from docs/api.md: {sorted(set(missing))}"
    assert not no_example, f"endpoints without a curl example: {sorted(set(no_example))}"
