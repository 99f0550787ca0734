"""Docs are part of the feature: the configuration table is generated from the code."""

from __future__ import annotations

from pathlib import Path

from flask_llmauth.config import PREFIX, Settings, documentation_table

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_doc_lists_every_setting_as_generated() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert documentation_table() in doc, "regenerate: python docs/generate.py"
    for field in Settings.table():
        assert f"`{PREFIX}{field.name.upper()}`" in doc
