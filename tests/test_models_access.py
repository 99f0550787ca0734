"""Model access through real LLM requests: lists on keys, teams, team members and users,
the special names, wildcards, access groups (config and ``model_list``), aliases (global,
key, team), deployments, models named in the URL, and bodies that name models badly.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import jsonify, request

from flask_llmauth import check_model_access, require_model_access
from tests.helpers import ADMIN, assert_error, bearer, record_secret

CONFIG = {
    "LLMAUTH_MODEL_ACCESS_GROUPS": {"beta-models": ["gpt-5", "o3"]},
    "LLMAUTH_MODEL_LIST": [
        {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o"}},
        {"model_name": "sonnet", "litellm_params": {"model": "anthropic/claude-3-5-sonnet"},
         "model_info": {"access_groups": ["anthropic-models"]}},
        {"model_name": "haiku", "litellm_params": {"model": "anthropic/claude-3-5-haiku"},
         "model_info": {"access_groups": ["anthropic-models", "cheap-models"]}},
    ],
    "LLMAUTH_MODEL_ALIAS_MAP": {"cheap": "gpt-4o-mini"},
}
UNIVERSE = ("gpt-4o", "gpt-4o-mini", "gpt-5", "o3", "sonnet", "haiku", "openai/gpt-4o",
            "openai/o1", "anthropic/claude-3-5-sonnet", "cheap", "mistral-large")
EVERYTHING = set(UNIVERSE)


@pytest.fixture
def mclient(app_factory: Any) -> Any:
    return app_factory(config=CONFIG).test_client()


def post(client: Any, path: str, headers: dict[str, str], **body: Any) -> Any:
    return client.post(path, json=body, headers=headers)


def key_for(client: Any, **fields: Any) -> str:
    response = client.post("/key/generate", json=fields, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    return record_secret(response.get_json()["key"])


def allowed(client: Any, key: str, names: tuple[str, ...] = UNIVERSE) -> set[str]:
    """The models this key may call, asked of the gateway one chat request at a time."""
    out = set()
    for model in names:
        response = post(client, "/v1/chat/completions", bearer(key), model=model)
        assert response.status_code in (200, 403), (model, response.get_json())
        if response.status_code == 200:
            assert response.get_json()["model"] == model
            out.add(model)
        else:
            assert response.get_json()["error"]["type"].endswith("_model_access_denied")
            assert response.get_json()["error"]["param"] == "model"
    return out


def admin_post(client: Any, path: str, **body: Any) -> dict[str, Any]:
    response = client.post(path, json=body, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("models,expected", [
    ([], EVERYTHING),
    (["*"], EVERYTHING),
    (["all-proxy-models"], EVERYTHING),
    (["gpt-4o"], {"gpt-4o"}),
    (["gpt-4o", "gpt-5"], {"gpt-4o", "gpt-5"}),
    # a wildcard, matched against names and against a model_list entry's deployment
    (["openai/*"], {"gpt-4o", "openai/gpt-4o", "openai/o1"}),
    (["anthropic/*"], {"sonnet", "haiku", "anthropic/claude-3-5-sonnet"}),
    (["gpt-*"], {"gpt-4o", "gpt-4o-mini", "gpt-5", "cheap"}),
    # access groups: from LLMAUTH_MODEL_ACCESS_GROUPS and from model_list model_info
    (["beta-models"], {"gpt-5", "o3"}),
    (["anthropic-models"], {"sonnet", "haiku"}),
    (["cheap-models", "beta-models"], {"haiku", "gpt-5", "o3"}),
    # the global alias cheap -> gpt-4o-mini: allowed when the alias or its target is
    (["gpt-4o-mini"], {"gpt-4o-mini", "cheap"}),
    (["cheap"], {"cheap"}),
    (["no-such-model"], set()),
])
def test_key_model_lists(mclient: Any, models: list[str], expected: set[str]) -> None:
    assert allowed(mclient, key_for(mclient, models=models)) == expected


def test_key_aliases_allow_alias_or_target(mclient: Any) -> None:
    key = key_for(mclient, models=["gpt-4o"], aliases={"my-model": "gpt-4o", "sneaky": "gpt-5"})
    assert allowed(mclient, key, ("gpt-4o", "my-model", "sneaky", "gpt-5")) == {
        "gpt-4o", "my-model"}
    by_name = key_for(mclient, models=["my-model"], aliases={"my-model": "gpt-5"})
    assert allowed(mclient, by_name, ("my-model", "gpt-5")) == {"my-model"}


def test_team_models_and_team_aliases(mclient: Any) -> None:
    admin_post(mclient, "/team/new", team_id="t1", models=["gpt-4o", "sonnet"],
               model_aliases={"team-fast": "gpt-4o"})
    team_key = key_for(mclient, team_id="t1")
    assert allowed(mclient, team_key, (*UNIVERSE, "team-fast")) == {"gpt-4o", "sonnet",
                                                                     "team-fast"}
    narrower = key_for(mclient, team_id="t1", models=["gpt-4o"])
    assert allowed(mclient, narrower) == {"gpt-4o"}
    error = assert_error(post(mclient, "/v1/chat/completions", bearer(team_key), model="gpt-5"),
                         403, "team_model_access_denied")
    assert "Team=t1" in error["message"]


def test_all_team_models(mclient: Any) -> None:
    admin_post(mclient, "/team/new", team_id="t1", models=["gpt-4o", "sonnet"])
    admin_post(mclient, "/team/new", team_id="open")
    assert allowed(mclient, key_for(mclient, team_id="t1", models=["all-team-models"])) == {
        "gpt-4o", "sonnet"}
    assert allowed(mclient, key_for(mclient, team_id="open",
                                    models=["all-team-models"])) == EVERYTHING
    # Without a team the name stands for nothing: fail closed, never "all models".
    assert allowed(mclient, key_for(mclient, user_id="u1", models=["all-team-models"])) == set()
    assert allowed(mclient, key_for(mclient, models=["all-team-models", "gpt-5"])) == {"gpt-5"}


def test_user_models_apply_to_personal_keys_only(mclient: Any) -> None:
    admin_post(mclient, "/team/new", team_id="t1")
    admin_post(mclient, "/user/new", user_id="alice", models=["gpt-4o"], auto_create_key=False,
               teams=["t1"])
    assert allowed(mclient, key_for(mclient, user_id="alice")) == {"gpt-4o"}
    assert allowed(mclient, key_for(mclient, user_id="alice", team_id="t1")) == EVERYTHING
    error = assert_error(post(mclient, "/v1/chat/completions",
                              bearer(key_for(mclient, user_id="alice")), model="gpt-5"),
                         403, "user_model_access_denied")
    assert "gpt-5" in error["message"]


def test_no_default_models(mclient: Any) -> None:
    admin_post(mclient, "/team/new", team_id="t1", models=["sonnet"])
    admin_post(mclient, "/user/new", user_id="bob", models=["no-default-models"],
               auto_create_key=False, teams=["t1"])
    assert allowed(mclient, key_for(mclient, user_id="bob")) == set()
    assert allowed(mclient, key_for(mclient, user_id="bob", team_id="t1")) == {"sonnet"}


def test_team_member_allowed_models(mclient: Any) -> None:
    admin_post(mclient, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "carol", "role": "user"}, {"user_id": "dave", "role": "user"}])
    admin_post(mclient, "/team/member_update", team_id="t1", user_id="carol",
               allowed_models=["sonnet", "haiku"])
    assert allowed(mclient, key_for(mclient, user_id="carol", team_id="t1")) == {"sonnet",
                                                                                 "haiku"}
    assert allowed(mclient, key_for(mclient, user_id="dave", team_id="t1")) == EVERYTHING
    assert_error(post(mclient, "/v1/chat/completions",
                      bearer(key_for(mclient, user_id="carol", team_id="t1")), model="o3"),
                 403, "team_member_model_access_denied")


def test_model_changes_apply_to_cached_keys_at_once(mclient: Any) -> None:
    admin_post(mclient, "/team/new", team_id="t1", models=["gpt-4o"])
    key = key_for(mclient, team_id="t1")
    assert allowed(mclient, key, ("gpt-4o", "sonnet")) == {"gpt-4o"}
    admin_post(mclient, "/team/update", team_id="t1", models=["sonnet"])
    assert allowed(mclient, key, ("gpt-4o", "sonnet")) == {"sonnet"}


# -- where the model comes from ------------------------------------------------------------------


def test_model_from_the_url_on_gemini_routes(mclient: Any) -> None:
    key = key_for(mclient, models=["gemini-pro", "tunedModels/mine"])
    url = "/v1beta/models/{}:generateContent"
    assert mclient.post(url.format("gemini-pro"), json={}, headers=bearer(key)).get_json()[
        "model"] == "gemini-pro"
    assert mclient.post(url.format("tunedModels/mine"), json={},
                        headers=bearer(key)).status_code == 200
    assert_error(mclient.post(url.format("gemini-ultra"), json={}, headers=bearer(key)), 403,
                 "key_model_access_denied")
    # The key may come as ?key= on these routes, and the URL's model is still checked.
    assert mclient.post(url.format("gemini-pro") + f"?key={key}", json={}).status_code == 200
    assert_error(mclient.post(url.format("gemini-ultra") + f"?key={key}", json={}), 403)
    # A body naming another model is checked too: the view might use either.
    assert_error(mclient.post(url.format("gemini-pro"), json={"model": "gemini-ultra"},
                              headers=bearer(key)), 403)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/octet-stream", None])
@pytest.mark.parametrize("data", ['[{"model": "gpt-5"}]', "[{}]", '"gpt-5"', "0", "true"])
def test_a_json_body_that_is_not_an_object_is_a_400_whatever_its_content_type(
        mclient: Any, content_type: str | None, data: str) -> None:
    """The body of an LLM route is read as JSON whatever its Content-Type (above): a JSON
    value that is not an object is the 400 it is when sent as application/json. It used to
    pass (no model named) and stay in Flask's parse cache, so a view reading
    ``request.get_json(silent=True)`` got a list instead of ``None`` and answered 500."""
    key = key_for(mclient, models=["gpt-4o"])
    headers = {**bearer(key), **({"Content-Type": content_type} if content_type else {})}
    response = mclient.post("/v1/chat/completions", data=data, headers=headers)
    error = assert_error(response, 400, "invalid_request_error")
    assert error["message"] == "Request body must be a JSON object."
    for body in ("a=b", "not json", ""):  # not JSON: the form or nothing, as before
        assert mclient.post("/v1/chat/completions", data=body,
                            headers=headers).status_code == 200


def test_model_in_a_body_that_does_not_say_json(mclient: Any) -> None:
    key = key_for(mclient, models=["gpt-4o"])
    headers = {**bearer(key), "Content-Type": "text/plain"}
    assert_error(mclient.post("/v1/chat/completions", data='{"model": "gpt-5"}',
                              headers=headers), 403)
    assert mclient.post("/v1/chat/completions", data='{"model": "gpt-4o"}',
                        headers=headers).status_code == 200
    assert_error(mclient.post("/v1/chat/completions", data={"model": "gpt-5"},
                              headers=bearer(key)), 403)  # form-encoded
    assert_error(mclient.post("/v1/chat/completions", headers=bearer(key),
                              data={"model": "gpt-5", "file": (__import__("io").BytesIO(b"x"),
                                                               "a.wav")}), 403)  # multipart
    assert mclient.post("/v1/chat/completions", headers=bearer(key),
                        data={"model": "gpt-4o"}).status_code == 200


@pytest.mark.parametrize("model", [5, 1.5, True, ["gpt-4o"], {"name": "gpt-4o"}, "",
                                   "m" * 513])
def test_a_model_that_is_not_a_name_is_a_400(mclient: Any, model: Any) -> None:
    key = key_for(mclient)
    error = assert_error(post(mclient, "/v1/chat/completions", bearer(key), model=model), 400,
                         "invalid_request_error")
    assert error["param"] == "model"


def test_invalid_json_on_an_llm_route_is_a_400_after_authentication(mclient: Any) -> None:
    key = key_for(mclient)
    json_headers = {"Content-Type": "application/json"}
    assert_error(mclient.post("/v1/chat/completions", data="{not json", headers=json_headers),
                 401)
    assert_error(mclient.post("/v1/chat/completions", data="{not json",
                              headers={**json_headers, "Authorization": "Bearer sk-unknown-key"}),
                 401)
    error = assert_error(mclient.post("/v1/chat/completions", data="{not json",
                                      headers={**json_headers, **bearer(key)}), 400)
    assert "JSON" in error["message"]
    assert_error(mclient.post("/v1/chat/completions", data="[1, 2]",
                              headers={**json_headers, **bearer(key)}), 400)
    assert_error(mclient.post("/v1/chat/completions", data="[" * 5000 + "]" * 5000,
                              headers={**json_headers, **bearer(key)}), 400)
    # No body, or a body without a model: nothing to check here (the view decides).
    assert mclient.post("/v1/chat/completions", headers=bearer(key)).status_code == 200
    assert post(mclient, "/v1/chat/completions", bearer(key), messages=[]).status_code == 200


def test_models_listing_shows_only_allowed_models(mclient: Any) -> None:
    key = key_for(mclient, models=["gpt-4o", "claude-*"])
    assert mclient.get("/v1/models", headers=bearer(key)).get_json() == {
        "data": ["gpt-4o", "claude-3-5-sonnet"]}


def test_model_access_helpers_for_host_views(app_factory: Any) -> None:
    app = app_factory(config=CONFIG)

    @app.post("/custom/rerank")
    @app.llmauth.route_group("info_routes")
    @require_model_access("reranker")
    def rerank() -> Any:
        return jsonify(ok=True)

    @app.post("/custom/default-model")
    @app.llmauth.route_group("info_routes")
    def default_model() -> Any:
        check_model_access("gpt-4o")
        return jsonify(model="gpt-4o")

    client = app.test_client()
    key = key_for(client, models=["sonnet"])
    assert client.post("/custom/rerank", json={"reranker": "sonnet"},
                       headers=bearer(key)).status_code == 200
    assert_error(client.post("/custom/rerank", json={"reranker": "gpt-4o"}, headers=bearer(key)),
                 403, "key_model_access_denied")
    assert_error(client.post("/custom/default-model", headers=bearer(key)), 403)
    assert client.post("/custom/default-model", headers=ADMIN).status_code == 200


def test_names_for_answers_what_the_full_resolution_answers() -> None:
    """``names_for`` answers a name nothing resolves further without the general walk: the
    same names as ``_names`` for every alias table and deployment combination."""
    from flask_llmauth.authz.models import ModelAccess
    from flask_llmauth.principal import Principal, Role
    from flask_llmauth.store.records import KeyRecord, TeamRecord

    access = ModelAccess({}, {"cheap": "gpt-4o-mini"}, CONFIG["LLMAUTH_MODEL_LIST"])
    key = KeyRecord(id=1, key_id="k", key_name="n", aliases={"fast": "gpt-4o", "odd": 5})
    team = TeamRecord(id=2, team_id="t", model_aliases={"smart": "sonnet", "fast": "o3"})
    principals = [
        Principal(method="virtual_key", role=Role.INTERNAL_USER),
        Principal(method="virtual_key", role=Role.INTERNAL_USER, key=key),
        Principal(method="virtual_key", role=Role.INTERNAL_USER, key=key, team=team),
        Principal(method="jwt", role=Role.INTERNAL_USER, team=team),
    ]
    for principal in principals:
        tables = (principal.key.aliases if principal.key else None,
                  principal.team.model_aliases if principal.team else None)
        for model in (*UNIVERSE, "fast", "smart", "odd", "unknown"):
            assert access.names_for(principal, model) == access._names(model, tables)
    assert access.names_for(principals[0], "mistral-large") == ("mistral-large",)
    assert access.names_for(principals[0], "gpt-4o") == ("gpt-4o", "openai/gpt-4o")
    assert access.names_for(principals[2], "fast") == ("fast", "gpt-4o", "o3",
                                                       "openai/gpt-4o")
    assert access.names_for(principals[1], "cheap") == ("cheap", "gpt-4o-mini")


def test_require_model_access_reads_the_body_as_the_hook_does(app_factory: Any) -> None:
    """The field is read whatever the Content-Type (JSON sent as ``text/plain``, form
    fields), so a lenient view never uses a model the check did not see; a value that is
    not a model name (a list, an object, "") is a 400, not skipped."""
    app = app_factory(config=CONFIG, spend_enabled=False)

    @app.post("/custom/rerank")
    @app.llmauth.route_group("info_routes")
    @require_model_access("reranker")
    def rerank() -> Any:
        body = json.loads(request.get_data() or b"{}") if not request.form else request.form
        return jsonify(used=body.get("reranker"))

    client = app.test_client()
    key = bearer(key_for(client, models=["sonnet"]))
    plain = {**key, "Content-Type": "text/plain"}
    assert client.post("/custom/rerank", data=json.dumps({"reranker": "sonnet"}),
                       headers=plain).get_json() == {"used": "sonnet"}
    assert_error(client.post("/custom/rerank", data=json.dumps({"reranker": "gpt-4o"}),
                             headers=plain), 403, "key_model_access_denied")
    assert_error(client.post("/custom/rerank", data={"reranker": "gpt-4o"}, headers=key), 403)
    for bad in (["gpt-4o"], {"name": "gpt-4o"}, "", 5):
        error = assert_error(client.post("/custom/rerank", json={"reranker": bad},
                                         headers=key), 400)
        assert error["param"] == "reranker"
    assert_error(client.post("/custom/rerank", data="{", headers={
        **key, "Content-Type": "application/json"}), 400)
    assert_error(client.post("/custom/rerank", data="[" * 50_000, headers={
        **key, "Content-Type": "application/json"}), 400)
    assert client.post("/custom/rerank", json={"other": 1}, headers=key).status_code == 200
