"""First start of the example gateway: the generated master key, shown once, kept, reused.

Runs the README's ``flask --app example_app run`` and ``gunicorn 'example_app:create_app()'``
as real processes on loopback ports, each in a fresh working directory.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import requests

from tests.helpers import record_secret
from tests.integration.conftest import Admin, check_no_leaks
from tests.integration.gateway import (
    KEY_PATTERN,
    Gateway,
    flask_run,
    generated_master_key,
    gunicorn,
)

pytestmark = pytest.mark.integration


def _chat(gateway: Gateway, key: str) -> requests.Response:
    return requests.post(gateway.base_url + "/v1/chat/completions",
                         json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                         headers={"Authorization": f"Bearer {key}", "Connection": "close"},
                         timeout=10)


def test_first_start_generates_prints_and_stores_master_key_then_reuses_it(
        tmp_path: Path) -> None:
    workdir = tmp_path / "gw"
    first = flask_run(workdir)
    with first.start():
        output = first.output()
        master_key = record_secret(generated_master_key(output))
        # shown with how to use it
        assert "generated a master key" in output
        assert "/key/generate" in output and "Authorization: Bearer $MASTER_KEY" in output
        assert f"export MASTER_KEY={master_key}" in output
        # stored in the instance folder, owner read/write only
        key_file = workdir / "instance" / "master_key"
        assert str(key_file) in output
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key_file.read_text().strip() == master_key
        # the printed key is the admin key: it creates a virtual key that works
        virtual = Admin(first, master_key).new_key(models=["gpt-4o"])
        assert _chat(first, virtual["key"]).status_code == 200
        assert _chat(first, "sk-" + "x" * 43).status_code == 401
    check_no_leaks(first, printed_master_key=master_key)

    # second start (gunicorn, 2 workers) over the same instance folder: nothing printed,
    # the same master key, so the same key digests and the old virtual key still works
    second = gunicorn(workdir, name="second")
    with second.start():
        assert "generated a master key" not in second.output()
        assert KEY_PATTERN.findall(second.output()) == []
        assert key_file.read_text().strip() == master_key
        listed = Admin(second, master_key).get("/key/list")
        assert listed.status_code == 200
        assert virtual["key_id"] in listed.json()["keys"]
        for _ in range(4):
            assert _chat(second, virtual["key"]).status_code == 200
        assert _chat(second, "sk-" + "y" * 43).status_code == 401
    check_no_leaks(second)


def test_workers_starting_together_agree_on_one_generated_key(gateway: Gateway,
                                                              admin: Admin) -> None:
    """Both gunicorn workers run ``create_app()`` at once: one key is generated, printed
    once, and every worker accepts it."""
    output = gateway.output()
    assert output.count("generated a master key") == 1
    key_file = gateway.instance_path / "master_key"
    assert key_file.read_text().strip() == admin.master_key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in gateway.instance_path.iterdir()
            if p.name.startswith(".master_key")] == []  # no temporary file left behind
    seen = gateway.probe_every_worker("GET", "/v1/models", headers=admin.headers)
    assert all(status == 200 for statuses in seen.values() for status in statuses), seen
