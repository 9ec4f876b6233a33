"""The annotation app in process (FastAPI TestClient): auth, the JSON API, pages, forms, escaping."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from raylign.annotation.app import create_app
from raylign.annotation.store import Store
from raylign.annotation.tasks import Task, TaskItem, TaskSettings

MARKUP = '<script>alert("pwned")</script><b>bold?</b>'


@pytest.fixture
def app(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    items = [
        TaskItem(item_id="p1", kind="pairwise", prompt=[{"role": "system", "content": "Be kind."},
                                                        {"role": "user", "content": "Say <hi>"}],
                 response_a=MARKUP, response_b="A plain answer."),
        TaskItem(item_id="p2", kind="human-vs-model", prompt="Tell me a fact.", response_a="Water is wet.",
                 response_b="The sky is green.", source_a="human", source_b="model"),
        TaskItem(item_id="r1", kind="rating", prompt="Rate this", response_a="A fine text.",
                 criteria=["helpful", "kind & fair"]),
    ]
    store.load_task(Task(TaskSettings(overlap=1, instructions="Compare <carefully>."), items, "t"))
    ann, token = store.add_annotator("ann")
    other, other_token = store.add_annotator("bob")
    return store, TestClient(create_app(store)), token, other_token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_address_needs_a_token(app):
    store, client, token, _ = app
    assert client.get("/health").status_code == 200
    for method, path in [("GET", "/"), ("GET", "/api/next"), ("GET", "/api/progress"), ("GET", "/openapi.json"),
                         ("GET", "/item/p1"), ("GET", "/static/annotate.js"), ("POST", "/judge")]:
        r = client.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code)
    r = client.get("/api/next", headers=bearer("wrong-token"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
    assert r.headers["www-authenticate"] == "Bearer"
    # refused before the body is parsed: malformed JSON with a bad token is a 401, not a 400
    r = client.post("/api/judgments", content=b"{not json", headers={**bearer("wrong"), "content-type": "application/json"})
    assert r.status_code == 401
    assert client.get("/a/not-a-token").status_code == 401
    assert client.get("/docs", headers=bearer(token)).status_code == 404  # no Swagger UI from a CDN


def test_api_flow_until_204(app):
    store, client, token, other_token = app
    seen = []
    while True:
        r = client.get("/api/next", headers=bearer(token))
        if r.status_code == 204:
            break
        assert r.status_code == 200
        item = r.json()
        assert "source_a" not in item and "gold" not in item  # never shown to annotators
        assert item["shown_left"] in ("a", "b") and item["instructions"] == "Compare <carefully>."
        body = {"item_id": item["item_id"], "reason": "because"}
        if item["kind"] == "rating":
            assert item["criteria"] == ["helpful", "kind & fair"] and item["response_b"] is None
            body["ratings"] = {"helpful": 6, "kind & fair": 7}
        else:
            body.update(choice="a", strength=3)
        r = client.post("/api/judgments", json=body, headers=bearer(token))
        assert r.status_code == 201, r.text
        out = r.json()
        assert out["annotator"] == "ann" and out["via"] == "api" and out["time"].endswith("Z")
        assert out["shown_left"] == item["shown_left"] and out["latency_ms"] >= 0 and not out["replayed"]
        seen.append(item["item_id"])
    assert sorted(seen) == ["p1", "p2", "r1"]
    assert client.get("/api/progress", headers=bearer(token)).json() == {"done": 3, "remaining": 0, "total": 3}
    mine = client.get("/api/judgments", headers=bearer(token)).json()
    assert {j["item_id"] for j in mine} == {"p1", "p2", "r1"}
    # overlap 1: the other annotator's queue is empty, and they see none of ann's judgments
    assert client.get("/api/next", headers=bearer(other_token)).status_code == 204
    assert client.get("/api/judgments", headers=bearer(other_token)).json() == []
    assert client.get("/api/progress", headers=bearer(other_token)).json()["total"] == 0
    r = client.post("/api/judgments", json={"item_id": "p1", "choice": "b"}, headers=bearer(other_token))
    assert r.status_code == 409 and "already has its 1 annotator" in r.json()["error"]["message"]
    # a correction (201, supersedes) and a retry (201, replayed, no new row)
    r = client.post("/api/judgments", json={"item_id": "p1", "choice": "tie"}, headers=bearer(token))
    assert r.status_code == 201 and r.json()["supersedes"] is not None
    r2 = client.post("/api/judgments", json={"item_id": "p1", "choice": "tie"}, headers=bearer(token))
    assert r2.status_code == 201 and r2.json()["replayed"] and r2.json()["id"] == r.json()["id"]
    assert len(store.all_judgments()) == 4


@pytest.mark.parametrize("body, status, field, words", [
    ({"item_id": "p1", "choice": "maybe"}, 422, "choice", "Input should be 'a', 'b', 'tie' or 'skip'"),
    ({"item_id": "p1"}, 422, "choice", "choice is required"),
    ({"item_id": "p1", "choice": "tie", "strength": 2}, 422, "strength", "goes with choice a or b"),
    ({"item_id": "p1", "choice": "a", "strength": 4}, 422, "strength", "less than or equal to 3"),
    ({"item_id": "p1", "choice": "a", "ratings": {"x": 1}}, 422, "ratings", "not ratings"),
    ({"item_id": "p1", "choice": "a", "colour": "red"}, 422, "colour", "unknown field"),
    ({"item_id": "r1", "ratings": {"helpful": 3}}, 422, "ratings", "ratings missing for ['kind & fair']"),
    ({"item_id": "r1", "ratings": {"helpful": 3, "kind & fair": 9}}, 422, "ratings", "ratings are 1..7"),
    ({"item_id": "r1", "choice": "a"}, 422, "choice", "rating item"),
    ({"item_id": "p1", "choice": "a", "idempotency_key": "no spaces allowed"}, 422, "idempotency_key", "pattern"),
    ({"item_id": "nope", "choice": "a"}, 404, None, "no item 'nope'"),
    ({"item_id": "p1", "choice": "a", "written_by": "a"}, 422, "written_by", "asked of human-vs-model items"),
    ({"item_id": "p2", "choice": "a", "written_by": "human"}, 422, "written_by", "Input should be 'a' or 'b'"),
])
def test_invalid_judgments_get_clear_errors(app, body, status, field, words):
    store, client, token, _ = app
    r = client.post("/api/judgments", json=body, headers=bearer(token))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field and words in error["message"], error
    assert store.all_judgments() == []


def test_bodies_that_are_not_json(app):
    _, client, token, _ = app
    r = client.post("/api/judgments", content=b"{oops", headers={**bearer(token), "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/api/judgments", content=b"item_id=p1", headers={**bearer(token),
                                                                   "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = client.post("/api/judgments", content=b"x" * 70_000, headers={**bearer(token), "content-type": "application/json"})
    assert r.status_code == 413


def test_openapi_schema_lists_the_api(app):
    _, client, token, _ = app
    schema = client.get("/openapi.json", headers=bearer(token)).json()
    assert {"/api/next", "/api/judgments", "/api/progress"} <= set(schema["paths"])
    assert not any(p in schema["paths"] for p in ("/", "/judge", "/item/{item_id}", "/a/{token}"))
    post = schema["paths"]["/api/judgments"]["post"]
    assert "201" in post["responses"] and "422" in post["responses"] and "401" in post["responses"]
    assert "204" in schema["paths"]["/api/next"]["get"]["responses"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert set(schema["components"]["schemas"]["JudgmentIn"]["properties"]) >= {"item_id", "choice", "strength",
                                                                                 "ratings", "reason"}


def _login(client: TestClient, token: str) -> None:
    r = client.get(f"/a/{token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and token in cookie


def _form(html: str) -> dict[str, str]:
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', html))


def test_pages_render_model_text_as_text(app):
    store, client, token, _ = app
    _login(client, token)
    page = client.get("/item/p1")
    assert page.status_code == 200
    html = page.text
    assert MARKUP not in html and "<b>bold?</b>" not in html
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;&lt;b&gt;bold?&lt;/b&gt;" in html
    assert "Say &lt;hi&gt;" in html and "Compare &lt;carefully&gt;." in html
    assert html.count('class="turn turn-') == 2 and "turn-system" in html
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["cache-control"] == "no-store"
    assert '<script src="/static/annotate.js"' in html and html.count("<script") == 1
    js = client.get("/static/annotate.js")
    assert js.status_code == 200 and "requestSubmit" in js.text


def test_the_form_works_without_javascript(app):
    store, client, token, _ = app
    _login(client, token)
    html = client.get("/item/p1").text
    fields = _form(html)
    assert set(fields) == {"csrf_token", "item_id", "idempotency_key"}
    left = store.shown_left(store.annotator_by_token(token), store.item("p1"))
    # no CSRF token: refused, nothing stored
    r = client.post("/judge", data={"item_id": "p1", "choice": "left"}, follow_redirects=False)
    assert r.status_code == 403 and store.all_judgments() == []
    r = client.post("/judge", data={**fields, "choice": "left", "strength": "2", "reason": "nicer <3"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    (j,) = store.current_judgments()
    assert (j.item_id, j.choice, j.shown_left, j.strength, j.reason, j.via) == ("p1", left, left, 2, "nicer <3", "page")
    # the same form sent again (double click, browser retry) is one row
    client.post("/judge", data={**fields, "choice": "left", "strength": "2", "reason": "nicer <3"})
    assert len(store.all_judgments()) == 1
    # a tie ignores a ticked strength; an unknown button re-renders with the problem (422)
    again = _form(client.get("/item/p1").text)
    assert "You already answered this item" in client.get("/item/p1").text
    r = client.post("/judge", data={**again, "choice": "sideways"})
    assert r.status_code == 422 and "choose one of the buttons" in r.text
    client.post("/judge", data={**again, "choice": "tie", "strength": "3"})
    assert store.current_judgments()[0].choice == "tie" and store.current_judgments()[0].strength is None


def test_rating_page_and_form(app):
    store, client, token, _ = app
    _login(client, token)
    html = client.get("/item/r1").text
    assert html.count('name="rating-0"') == 7 and html.count('name="rating-1"') == 7
    assert "kind &amp; fair" in html
    fields = _form(html)
    r = client.post("/judge", data={**fields, "choice": "rate", "rating-0": "5"})
    assert r.status_code == 422 and "ratings missing for" in r.text and "kind &amp; fair" in r.text
    assert store.all_judgments() == []
    r = client.post("/judge", data={**fields, "choice": "rate", "rating-0": "5", "rating-1": "2"}, follow_redirects=False)
    assert r.status_code == 303
    assert store.current_judgments()[0].ratings == {"helpful": 5, "kind & fair": 2}
    skip = _form(client.get("/item/r1").text)
    client.post("/judge", data={**skip, "choice": "skip"})
    assert store.current_judgments()[0].choice == "skip" and store.current_judgments()[0].ratings is None


def test_cookie_auth_needs_csrf_for_json_posts(app):
    store, client, token, _ = app
    _login(client, token)
    r = client.post("/api/judgments", json={"item_id": "p1", "choice": "a"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf"
    ann = store.annotator_by_token(token)
    r = client.post("/api/judgments", json={"item_id": "p1", "choice": "a"},
                    headers={"X-CSRF-Token": store.csrf_token(ann)})
    assert r.status_code == 201
    assert client.get("/api/progress").json()["done"] == 1  # GETs work with the cookie


def test_done_page_and_previous_link(app):
    store, client, token, _ = app
    _login(client, token)
    ann = store.annotator_by_token(token)
    for item_id in ("p1", "p2"):
        store.record(ann, item_id, choice="a")
    store.record(ann, "r1", choice="skip")
    html = client.get("/").text
    assert 'id="done"' in html and "You answered 3 items" in html and 'href="/item/r1"' in html


def test_which_one_a_person_wrote_on_the_page_and_the_api(app):
    store, client, token, other_token = app
    _login(client, token)
    ann = store.annotator_by_token(token)
    html = client.get("/item/p2").text
    assert "Which one?" in html and 'name="written_by" value="left"' in html
    assert "Which one?" not in client.get("/item/p1").text  # only human-vs-model items ask
    left = store.shown_left(ann, store.item("p2"))
    right = "b" if left == "a" else "a"
    r = client.post("/judge", data={**_form(html), "choice": "left", "written_by": "right"}, follow_redirects=False)
    assert r.status_code == 303
    (j,) = store.current_judgments()
    assert (j.choice, j.written_by) == (left, right)  # page sides mapped to the item's answers
    assert 'value="right" id="written-right" checked' in client.get("/item/p2").text  # shown again as answered
    # "cannot judge" answers nothing
    client.post("/judge", data={**_form(client.get("/item/p2").text), "choice": "skip", "written_by": "left"})
    assert store.current_judgments()[0].written_by is None
    # the API (a program with the bearer token): reads the judgment back, then corrects it
    api = TestClient(client.app)
    r = api.get("/api/judgments", headers=bearer(token))
    assert r.status_code == 200 and r.json()[0]["written_by"] is None
    r = api.post("/api/judgments", json={"item_id": "p2", "choice": "b", "written_by": "a"}, headers=bearer(token))
    assert r.status_code == 201 and r.json()["written_by"] == "a"
    assert store.current_judgments()[0].written_by == "a"
