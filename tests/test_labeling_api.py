"""The real labeling server, driven through gradio_client and plain HTTP: API, bad input, hardening."""

from __future__ import annotations

import json

import httpx
import pytest
from gradio_client.exceptions import AppError

from _labeling_server import Server, client, make_store, make_users
from alignkit.store import open_store
from alignkit.store.agreement import load_votes

XSS = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labeling-api")
    db = make_store(str(tmp / "labels.db"), tmp, 30)
    users = tmp / "users.json"
    creds = make_users(users, ["alice", "bob", "carol", "dave"], admins=("alice",))
    server = Server(db, users=users, overlap=2, log=tmp / "server.log").start()
    try:
        yield {"tmp": tmp, "db": db, "users": users, "creds": creds, "url": server.url, "server": server}
    finally:
        server.stop()


def votes_in(db):
    store = open_store(db, create=False)
    try:
        return load_votes(store)
    finally:
        store.close()


def login(url, name, password) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=10)
    r = c.post("/login", data={"username": name, "password": password})
    assert r.status_code == 200, r.text
    return c


def test_api_votes_as_the_logged_in_annotator(env):
    bob = client(env["url"], ("bob", env["creds"]["bob"]))
    cid, prompt, a, b = bob.predict(api_name="/next_item")
    assert isinstance(cid, int) and prompt.startswith("Prompt ") and a and b
    assert bob.predict(api_name="/next_item")[0] == cid  # the lease held is returned again
    receipt = bob.predict(comparison_id=cid, choice="a", rationale="clearer", api_name="/submit_vote")
    assert receipt["comparison_id"] == cid and receipt["choice"] == "a"
    progress = bob.predict(api_name="/progress")
    assert progress["done"] == 1 and progress["remaining"] == 29
    (vote,) = [v for v in votes_in(env["db"]) if v.annotator == "bob"]
    assert (vote.comparison_id, vote.rationale) == (cid, "clearer")
    # undo returns the same comparison; vote again
    again = bob.predict(api_name="/undo_last_vote")
    assert again[0] == cid and again[2] == a
    bob.predict(comparison_id=cid, choice="tie", api_name="/submit_vote")
    assert [v.choice for v in votes_in(env["db"]) if v.annotator == "bob"] == ["tie"]
    # skip: the next item is a different comparison, and the skipped one never comes back
    nxt = bob.predict(api_name="/next_item")[0]
    bob.predict(comparison_id=nxt, api_name="/skip")
    assert bob.predict(api_name="/next_item")[0] not in (cid, nxt)


def test_api_bad_input_is_refused_and_stores_nothing(env):
    log = env["tmp"] / "server.log"
    logged = len(log.read_bytes())
    carol = client(env["url"], ("carol", env["creds"]["carol"]))
    cid = carol.predict(api_name="/next_item")[0]
    before = len(votes_in(env["db"]))
    with pytest.raises(AppError, match="unknown choice 'left'"):
        carol.predict(comparison_id=cid, choice="left", api_name="/submit_vote")
    with pytest.raises(AppError, match="comparison 987654 does not exist"):
        carol.predict(comparison_id=987654, choice="a", api_name="/submit_vote")
    other = next(c for c in range(1, 31) if c != cid)
    with pytest.raises(AppError, match=f"comparison {other} is not assigned to carol"):
        carol.predict(comparison_id=other, choice="a", api_name="/submit_vote")
    assert len(votes_in(env["db"])) == before
    carol.predict(comparison_id=cid, choice="both_bad", api_name="/submit_vote")
    with pytest.raises(AppError, match="already voted"):
        carol.predict(comparison_id=cid, choice="a", api_name="/submit_vote")
    assert len(votes_in(env["db"])) == before + 1
    with pytest.raises(AppError, match="comparison id must be an integer, got 'abc'"):
        carol.predict(comparison_id="abc", api_name="/skip")
    cid = carol.predict(api_name="/next_item")[0]
    with pytest.raises(AppError, match="rationale must be a string, got list"):
        carol.predict(comparison_id=cid, choice="a", rationale=["x"], api_name="/submit_vote")
    assert len(votes_in(env["db"])) == before + 1
    # Refusals are the caller's mistakes: no traceback each in the server log (Gradio printed one per refusal).
    assert "Traceback" not in log.read_bytes()[logged:].decode()


def test_serve_says_where_it_listens_and_no_share_hint(env):
    """Share links are off on purpose; Gradio's banner suggested `share=True` anyway."""
    log = (env["tmp"] / "server.log").read_text()
    assert f"alignkit label: serving {env['db']} on {env['url']} (overlap 2, login required)" in log
    assert "share" not in log


def test_wrong_password_and_unknown_user_are_refused(env):
    with pytest.raises(Exception):
        client(env["url"], ("bob", "not-the-password"))
    with pytest.raises(Exception):
        client(env["url"], ("mallory", "whatever123"))
    c = httpx.Client(base_url=env["url"])
    for name, pw in (("bob", "nope"), ("mallory", "x"), ("bob", "")):
        r = c.post("/login", data={"username": name, "password": pw})
        assert r.status_code in (400, 401, 422)
        assert c.get("/config").status_code == 401


def test_without_login_only_the_login_page_answers(env):
    c = httpx.Client(base_url=env["url"], timeout=10)
    page = c.get("/")
    assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
    assert "ak-vote-a" not in page.text and "Prompt 0" not in page.text
    for path in ["/config", "/gradio_api/info", "/gradio_api/openapi.json", "/gradio_api/queue/data",
                 "/gradio_api/file=" + env["db"], "/gradio_api/call/next_item/x", "/monitoring"]:
        r = c.get(path)
        assert r.status_code in (401, 403, 404), (path, r.status_code)
        assert "Prompt" not in r.text
    for path, body in [("/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "x"}),
                       ("/gradio_api/call/next_item", {"data": []}),
                       ("/gradio_api/call/submit_vote", {"data": [1, "a", ""]}),
                       ("/gradio_api/run/next_item", {"data": []})]:
        r = c.post(path, json=body)
        assert r.status_code in (401, 403, 404), (path, r.status_code)
    assert not [v for v in votes_in(env["db"]) if v.annotator not in env["creds"]]


def test_file_route_serves_nothing_it_should_not(env):
    c = login(env["url"], "dave", env["creds"]["dave"])
    secret_paths = [env["db"], env["db"] + "-wal", str(env["users"]), "/etc/passwd", str(env["tmp"] / "server.log")]
    probes = []
    for p in secret_paths:
        probes += [f"/gradio_api/file={p}", f"/file={p}", f"/gradio_api/file/{p.lstrip('/')}"]
    probes += [
        "/gradio_api/file=../../../../../../etc/passwd",
        "/gradio_api/file=..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/gradio_api/file=labels.db",
        "/gradio_api/file=pyproject.toml",
        "/static/../../../pyproject.toml",
        "/assets/..%2f..%2f..%2fpyproject.toml",
        "/gradio_api/proxy=http://127.0.0.1:1/",
    ]
    for path in probes:
        r = c.get(path)
        assert r.status_code in (400, 403, 404), (path, r.status_code)
        assert "root:" not in r.text and "SQLite format" not in r.text and "scrypt" not in r.text


def test_monitoring_is_off_even_when_logged_in(env):
    c = login(env["url"], "dave", env["creds"]["dave"])
    for path in ["/monitoring", "/gradio_api/monitoring", "/monitoring/summary"]:
        r = c.get(path)
        assert r.status_code in (403, 404), (path, r.status_code)


def test_simulated_annotator_cli_labels_through_the_server(env, capsys):
    from labeling_ui.cli import main

    before = len(votes_in(env["db"]))
    assert main(["simulate", "--url", env["url"], "--judge", "length", "--user", f"alice:{env['creds']['alice']}",
                 "--votes", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["votes"] == 5 and result["errors"] == []
    assert len(votes_in(env["db"])) == before + 5
    # a judge from a module, and users created on the fly in the server's users file
    assert main(["simulate", "--url", env["url"], "--judge", "labeling_ui.simulate:length_judge".join(["python:", ""]),
                 "--users", str(env["users"]), "--annotators", "2", "--votes", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["votes"] == 4 and set(result["per_annotator"]) == {"sim-1", "sim-2"}


def test_sessions_end_when_a_user_is_removed_or_their_password_changes(env):
    from labeling_ui.users import add_user

    add_user(env["users"], "erin", "erins first password")  # added while serving
    add_user(env["users"], "frank", "franks password")
    erin = client(env["url"], ("erin", "erins first password"))
    frank = client(env["url"], ("frank", "franks password"))
    raw = login(env["url"], "erin", "erins first password")
    assert erin.predict(api_name="/progress")["done"] == 0 and frank.predict(api_name="/next_item")[0]
    assert raw.get("/config").status_code == 200

    add_user(env["users"], "erin", "erins second password")  # a password reset ends every erin session
    with pytest.raises(Exception):  # gradio_client gives up on the 401 (CancelledError)
        erin.predict(api_name="/next_item")
    assert raw.get("/config").status_code == 401
    assert client(env["url"], ("erin", "erins second password")).predict(api_name="/progress")["done"] == 0

    data = json.loads(env["users"].read_text())
    del data["users"]["frank"]
    env["users"].write_text(json.dumps(data))  # removed: the open session can no longer vote
    with pytest.raises(Exception):
        frank.predict(api_name="/next_item")
    assert not [v for v in votes_in(env["db"]) if v.annotator in ("erin", "frank")]


def test_failed_logins_make_the_name_wait_but_not_a_browser_it_logged_in_from(env):
    from labeling_ui.guard import ThrottleSettings
    from labeling_ui.users import add_user

    add_user(env["users"], "grace", "graces password")
    grace = httpx.Client(base_url=env["url"], timeout=30)
    assert grace.post("/login", data={"username": "grace", "password": "graces password"}).status_code == 200
    stranger = httpx.Client(base_url=env["url"], timeout=30)  # same address, no cookie of grace's
    for _ in range(ThrottleSettings().name_failures):
        assert stranger.post("/login", data={"username": "grace", "password": "guess"}).status_code == 400
    # Now the right password waits, unchecked, for a browser new to the name; grace's own browser logs in.
    r = stranger.post("/login", data={"username": "grace", "password": "graces password"})
    assert r.status_code == 429 and "for this user name" in r.json()["detail"]
    assert grace.post("/login", data={"username": "grace", "password": "graces password"}).status_code == 200
    login(env["url"], "dave", env["creds"]["dave"])
