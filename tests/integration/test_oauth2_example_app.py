"""The example gateway configured only through a LiteLLM-style YAML file for OAuth2
introspection (flat ``general_settings`` keys, ``os.environ/NAME`` secrets), served by
gunicorn and driven by the ``openai`` SDK with an opaque IdP token as ``api_key``."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import dump_database
from tests.helpers import record_secret
from tests.idp_fixture import OPAQUE, IdP, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def gateway(config_file: Path, environ: dict[str, str], workdir: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LLMAUTH_", "LITELLM_", "OAUTH_", "JWT_", "DATABASE_URL"))}
    env.update(environ, PYTHONPATH=str(ROOT), LLMAUTH_CONFIG_FILE=str(config_file))
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or "gunicorn"
    log = open(workdir / "gateway.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [gunicorn, "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4",
         "example_app:create_app()"], cwd=ROOT, env=env, stdout=log, stderr=log,
        stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError((workdir / "gateway.log").read_text()[-3000:])
            try:
                if requests.get(base + "/health/liveliness", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the worker is booting
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start: "
                                   + (workdir / "gateway.log").read_text()[-3000:])
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def test_example_app_with_litellm_yaml_oauth2_and_openai_sdk(idp: IdP, tmp_path: Path) -> None:
    master = record_secret("sk-" + secrets.token_urlsafe(32))
    config = tmp_path / "litellm_config.yaml"
    config.write_text(textwrap.dedent(f"""
        model_list:
          - model_name: gpt-4o
            litellm_params: {{model: openai/gpt-4o}}
          - model_name: gpt-4o-mini
            litellm_params: {{model: openai/gpt-4o-mini}}
        general_settings:
          master_key: os.environ/GATEWAY_MASTER_KEY
          database_url: sqlite:///{tmp_path}/gateway.db
          enable_oauth2_auth: true
          oauth_token_info_endpoint: {idp.introspection_endpoint}
          oauth_client_id: llmauth-gateway
          oauth_client_secret: os.environ/GATEWAY_OAUTH_SECRET
          oauth_user_id_field_name: user_id
          oauth_user_role_field_name: role
          oauth_user_team_id_field_name: team_id
    """))
    environ = {"GATEWAY_MASTER_KEY": master,
               "GATEWAY_OAUTH_SECRET": idp.secret("llmauth-gateway")}
    # an idle keep-alive connection delays the server's graceful stop (~2 s): the SDK clients
    # close before it stops, a response kept until then came on a connection it closed
    with gateway(config, environ, tmp_path) as base, ExitStack() as sdk:
        created = requests.post(base + "/team/new", json={"team_id": "team-4o",
                                                          "models": ["gpt-4o"]},
                                headers={"Authorization": f"Bearer {master}",
                                         "Connection": "close"}, timeout=10)
        assert created.status_code == 200, created.text

        token = idp.token(resource=OPAQUE, scope="read",
                          extra_claims={"user_id": "sdk-user", "team_id": "team-4o",
                                        "role": "internal_user"})
        client = sdk.enter_context(
            openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0))
        reply = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.total_tokens > 0
        chunks = list(client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello"}], stream=True))
        assert chunks and any(c.choices and c.choices[0].delta.content for c in chunks)
        assert [m.id for m in client.models.list()] == ["gpt-4o"]

        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
        whoami = requests.get(base + "/v1/whoami", headers={"Authorization": f"Bearer {token}"},
                              timeout=10).json()
        assert whoami["method"] == "oauth2" and whoami["user_id"] == "sdk-user"

        forged = sdk.enter_context(openai.OpenAI(
            base_url=base + "/v1", max_retries=0,
            api_key=record_secret("opaque-" + secrets.token_urlsafe(32))))
        with pytest.raises(openai.AuthenticationError):
            forged.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
        # a management route is not reachable with an OAuth2 token
        assert requests.post(base + "/key/generate", json={}, timeout=10,
                             headers={"Authorization": f"Bearer {token}"}).status_code == 401
    log = (tmp_path / "gateway.log").read_text()
    rows = dump_database(f"sqlite:///{tmp_path}/gateway.db")
    for secret in (token, idp.secret("llmauth-gateway"), master):
        assert secret not in log and secret not in rows
