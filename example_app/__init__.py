"""An OpenAI-compatible LLM gateway built on flask_llmauth.

Run it with ``flask --app example_app run`` or ``gunicorn 'example_app:create_app()'``.
Every ``LLMAUTH_*`` environment variable becomes the Flask config key of the same name
(JSON-decoded when it parses as JSON). By default it answers from a deterministic built-in
fake model; set ``GATEWAY_UPSTREAM_BASE_URL`` (and ``GATEWAY_UPSTREAM_API_KEY``) to forward
requests to a real OpenAI-compatible upstream instead (``GATEWAY_UPSTREAM_MAX_BYTES`` caps a
non-streamed answer, ``GATEWAY_UPSTREAM_TIMEOUT`` bounds the exchange;
:mod:`example_app.upstream` says what is passed each way).
``GATEWAY_INSTANCE_PATH`` moves the
instance folder (generated master key, SQLite database) away from Flask's default.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from flask import Flask, Response, jsonify, render_template, request, stream_with_context
from werkzeug.exceptions import HTTPException

from flask_llmauth import LLMAuth, allowed_models, current_principal
from flask_llmauth.config import load_settings
from flask_llmauth.errors import BadRequest, http_exception_response
from flask_llmauth.signals import soft_budget_crossed

from . import fake_model
from .upstream import Upstream

DEFAULT_MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet-latest", "text-embedding-3-small")
MASTER_KEY_FILE = "master_key"


def _env_config(environ: Mapping[str, str]) -> dict[str, Any]:
    """``LLMAUTH_*`` environment variables as config values (``LLMAUTH_TEST_*`` belong to
    the test harness and are skipped)."""
    config: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith("LLMAUTH_") or name.startswith("LLMAUTH_TEST_"):
            continue
        config[name] = _env_value(raw)
    return config


def _env_value(raw: str) -> Any:
    """An environment variable's value, JSON-decoded when it parses as JSON."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _instance_path(value: str | None) -> str | None:
    return os.path.abspath(value) if value else None


def _ensure_master_key(app: Flask) -> None:
    """Generate a master key on first start when none is configured; keep it in the instance
    folder (mode 0600) and print it once.

    The file appears atomically, complete and with its final mode (written to a private
    temporary file, then hard-linked into place), so several workers starting at once agree
    on one key and none reads a half-written file.
    """
    # warn=False: LLMAuth(app) reads the same settings next, and warns about them once.
    if load_settings(app.config, warn=False).master_key:
        return
    path = os.path.join(app.instance_path, MASTER_KEY_FILE)
    os.makedirs(app.instance_path, mode=0o700, exist_ok=True)  # owner-only when created here
    if not os.path.exists(path):
        key = "sk-" + secrets.token_urlsafe(32)
        fd, tmp = tempfile.mkstemp(prefix=".master_key.", dir=app.instance_path)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(key + "\n")
            os.link(tmp, path)
        except FileExistsError:
            pass  # another worker won the race: use its key
        else:
            app.config["LLMAUTH_MASTER_KEY"] = key
            _announce_master_key(key, path)
            return
        finally:
            os.unlink(tmp)
    with open(path, encoding="utf-8") as fh:
        mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        if mode & 0o077:  # written by hand or copied: others may read the master key
            app.logger.warning("%s holds the master key and other users may read it (mode "
                               "%03o): chmod 600 %s", path, mode, path)
        app.config["LLMAUTH_MASTER_KEY"] = fh.read().strip()


def _announce_master_key(key: str, path: str) -> None:
    print(
        "\n  flask_llmauth generated a master key (shown only this once; stored in "
        f"{path}, mode 0600):\n\n    export MASTER_KEY={key}\n\n"
        "  Create a virtual key with it (use this server's address instead of "
        "localhost:5000 if it differs):\n"
        "    curl -s localhost:5000/key/generate -H \"Authorization: Bearer $MASTER_KEY\" "
        "-H 'Content-Type: application/json' -d '{\"models\": [\"gpt-4o\"]}'\n\n"
        "  Then call /v1/chat/completions (OpenAI SDK: base_url=http://localhost:5000/v1) or "
        "/v1/messages (Anthropic SDK: base_url=http://localhost:5000) with the returned key.\n",
        file=sys.stderr, flush=True,
    )


def _body() -> dict[str, Any]:
    """The request's JSON object, with the fields every LLM route reads typed (a 400 naming
    the field otherwise, as the OpenAI and Anthropic APIs answer)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required.", param="model")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise BadRequest("`max_tokens` must be a positive integer.", param="max_tokens")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise BadRequest("`stream` must be true or false.", param="stream")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise BadRequest("`stream_options` must be an object.", param="stream_options")
    return body


def _messages(body: Mapping[str, Any]) -> None:
    messages = body.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) for m in messages)):
        raise BadRequest("`messages` must be a non-empty list of message objects.",
                         param="messages")


def _log_soft_budget(sender: Flask, *, level: str, entity_id: str, spend: float | None,
                     soft_budget: float | None, **_: Any) -> None:
    """A soft budget never blocks; the library only sends ``soft_budget_crossed`` (once
    per window), so the gateway logs it (``entity_id`` is an id or a key's printable name,
    never a secret)."""
    sender.logger.warning("soft budget crossed: %s=%s spend=%s soft_budget=%s",
                          level, entity_id, spend, soft_budget)


def _sse(chunks: Iterator[str]) -> Response:
    return Response(stream_with_context(chunks), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache"})


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True,
                instance_path=_instance_path(os.environ.get("GATEWAY_INSTANCE_PATH")))
    app.config.update(_env_config(os.environ))
    app.config.setdefault("GATEWAY_MODELS", list(DEFAULT_MODELS))
    app.config.setdefault("GATEWAY_UPSTREAM_BASE_URL", os.environ.get("GATEWAY_UPSTREAM_BASE_URL"))
    app.config.setdefault("GATEWAY_UPSTREAM_API_KEY", os.environ.get("GATEWAY_UPSTREAM_API_KEY"))
    for name in ("GATEWAY_UPSTREAM_MAX_BYTES", "GATEWAY_UPSTREAM_TIMEOUT"):
        if name in os.environ:
            app.config.setdefault(name, _env_value(os.environ[name]))
    if config:
        app.config.update(config)
    _ensure_master_key(app)
    llmauth = LLMAuth(app)
    soft_budget_crossed.connect(_log_soft_budget, sender=app)
    upstream = Upstream.from_config(app.config)

    def models() -> list[str]:
        listed = [m["model_name"] for m in llmauth_state().settings.model_list
                  if m.get("model_name")]
        return listed or list(app.config["GATEWAY_MODELS"])

    def llmauth_state() -> Any:
        return app.extensions["llmauth"]

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return http_exception_response(exc)

    @app.get("/")
    @llmauth.exempt
    def index() -> str:
        return render_template("index.html", models=models())

    @app.get("/health/liveliness")
    def liveliness() -> Response:
        return jsonify(status="healthy")

    @app.get("/health/readiness")
    def readiness() -> Any:
        if llmauth.database_ready():
            return jsonify(status="healthy", db="connected")
        return jsonify(status="unhealthy", db="disconnected"), 503

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    def chat_completions() -> Response:
        body = _body()
        _messages(body)
        if upstream is not None:
            return upstream.forward("/chat/completions", body)
        if body.get("stream"):
            chunks = (f"data: {json.dumps(c)}\n\n" for c in fake_model.chat_completion_chunks(body))
            return _sse(itertools.chain(chunks, ["data: [DONE]\n\n"]))
        return jsonify(fake_model.chat_completion(body))

    @app.post("/v1/completions")
    @app.post("/completions")
    def completions() -> Response:
        body = _body()
        if body.get("prompt") is not None and not isinstance(body["prompt"], (str, list)):
            raise BadRequest("`prompt` must be a string or a list.", param="prompt")
        if upstream is not None:
            return upstream.forward("/completions", body)
        return jsonify(fake_model.completion(body))

    @app.post("/v1/embeddings")
    @app.post("/embeddings")
    def embeddings() -> Response:
        body = _body()
        if body.get("input") in (None, "", []):
            raise BadRequest("`input` is required.", param="input")
        if upstream is not None:
            return upstream.forward("/embeddings", body)
        return jsonify(fake_model.embeddings(body))

    @app.get("/v1/models")
    @app.get("/models")
    def list_models() -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "flask_llmauth"}
                for m in allowed_models(models())]
        return jsonify(object="list", data=data)

    @app.post("/v1/messages")
    def messages() -> Response:
        body = _body()
        _messages(body)
        if upstream is not None:
            return upstream.forward("/messages", body)
        if body.get("stream"):
            events = fake_model.anthropic_events(body)
            return _sse(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)
        return jsonify(fake_model.anthropic_message(body))

    @app.get("/v1/whoami")
    def whoami() -> Response:
        principal = current_principal
        return jsonify(method=principal.method, role=principal.role.value,
                       user_id=principal.user_id, team_id=principal.team_id,
                       key_id=principal.key_id, key_name=principal.key_name)

    llmauth.route_group("info_routes")(whoami)
    return app
