"""The real labeling server's front door, through plain HTTP and gradio_client: uploads, body limits, logout,
session expiry, login throttling per address / name / browser, the page's policy, the display minimum."""

from __future__ import annotations

import time

import httpx
import pytest
from gradio_client.exceptions import AppError

from _labeling_server import Server, client, make_store, make_users
from alignkit.store import open_store
from alignkit.store.agreement import load_votes


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labeling-hardening")
    db = make_store(str(tmp / "labels.db"), tmp, 12)
    users = tmp / "users.json"
    names = ["ann", "bob", "cat", "dan", "eve", "gil"]
    creds = make_users(users, names, admins=("ann",))
    server = Server(db, users=users, overlap=3, log=tmp / "server.log", min_display=0.3).start()
    try:
        yield {"tmp": tmp, "db": db, "users": users, "creds": creds, "url": server.url, "server": server}
    finally:
        server.stop()


def http_from(url: str, address: str = "127.0.0.1") -> httpx.Client:
    """A client whose connections come from `address` (any 127.x.y.z is this machine's loopback)."""
    return httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address=address))


def log_in(c: httpx.Client, name: str, password: str) -> httpx.Response:
    return c.post("/login", data={"username": name, "password": password})


def logged_in(c: httpx.Client) -> bool:
    return c.get("/gradio_api/login_check").status_code == 200


def test_every_response_carries_a_real_content_security_policy(env):
    r = httpx.get(env["url"] + "/")
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'self'", "form-action 'self'", "frame-ancestors 'none'", "connect-src 'self'",
                      "object-src 'none'", "base-uri 'self'"):
        assert directive in csp
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]  # inline scripts need the nonce
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert r.text.count("<script") == r.text.count(f'<script nonce="{nonce}"') > 0
    assert 'src="alignkit/page.js"' in r.text
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(env["url"] + "/").headers["content-security-policy"] != csp  # a fresh nonce per page


def test_uploads_and_large_bodies_are_refused_before_parsing(env):
    c = http_from(env["url"])
    assert log_in(c, "bob", env["creds"]["bob"]).status_code == 200
    files = [("files", (f"f{i}.txt", b"x" * 1000, "text/plain")) for i in range(20)]
    r = c.post("/gradio_api/upload", files=files)
    assert r.status_code == 403 and "no uploads" in r.text
    assert not list(env["tmp"].rglob("f1.txt"))
    big = b'{"data": ["' + b"x" * (3 * 1024 * 1024) + b'"], "fn_index": 0, "session_hash": "s"}'
    r = c.post("/gradio_api/queue/join", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    chunked = c.post("/gradio_api/queue/join", content=iter([big[:1_000_000], big[1_000_000:]]),
                     headers={"content-type": "application/json"})
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    assert logged_in(c)  # and the server goes on serving


def test_logout_is_a_same_origin_post_and_get_cannot_log_anyone_out(env):
    c = http_from(env["url"])
    assert log_in(c, "cat", env["creds"]["cat"]).status_code == 200
    assert c.get("/logout", follow_redirects=False).status_code == 405  # what <img src="/logout"> would do
    assert logged_in(c)
    assert c.post("/logout", headers={"origin": "http://127.0.0.1:1"}).status_code == 403  # another site's form
    assert logged_in(c)
    assert c.post("/logout", headers={"origin": env["url"]}).status_code == 200
    assert not logged_in(c)
    assert c.get("/alignkit/session").status_code == 401


def test_the_session_endpoint_names_the_user_and_when_the_session_ends(env):
    c = http_from(env["url"])
    assert c.get("/alignkit/session").json()["ended"] is True
    before = time.time()
    assert log_in(c, "dan", env["creds"]["dan"]).status_code == 200
    s = c.get("/alignkit/session").json()
    assert s["user"] == "dan" and before + 12 * 3600 - 5 < s["expires_at"] < time.time() + 12 * 3600 + 5


def test_a_vote_sooner_than_the_display_minimum_is_refused_on_the_server(env):
    eve = client(env["url"], ("eve", env["creds"]["eve"]))
    cid = eve.predict(api_name="/next_item")[0]
    with pytest.raises(AppError, match=r"on screen for 0\.\d\d s; votes need at least 0\.3 s"):
        eve.predict(comparison_id=cid, choice="a", rationale="", api_name="/submit_vote")
    assert eve.predict(api_name="/next_item")[0] == cid  # nothing changed: still theirs
    time.sleep(0.35)
    assert eve.predict(comparison_id=cid, choice="a", rationale="", api_name="/submit_vote")["comparison_id"] == cid
    store = open_store(env["db"], create=False)
    try:
        assert [v.comparison_id for v in load_votes(store) if v.annotator == "eve"] == [cid]
    finally:
        store.close()


def test_login_waits_per_address_with_a_message_and_other_addresses_go_on(env, tmp_path):
    attacker = http_from(env["url"], "127.0.0.2")
    for name in ["ann", "cat", "dan", "eve"] + [f"name{i}" for i in range(16)]:  # one password sprayed across names
        assert log_in(attacker, name, "spring2026").status_code == 400
    r = log_in(attacker, "gil", env["creds"]["gil"])  # now even a right password waits, unchecked
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 25
    assert r.json()["detail"].startswith("Too many failed logins from this address: try again at ")
    assert abs(r.json()["retry_at"] - (time.time() + 30)) < 10
    assert log_in(http_from(env["url"], "127.0.0.3"), "gil", env["creds"]["gil"]).status_code == 200
    log = (env["tmp"] / "server.log").read_text()
    assert "address 127.0.0.2 made 20 failed logins" in log


def test_a_stranger_cannot_lock_an_annotator_out_of_their_browser(env):
    annotator = http_from(env["url"], "127.0.0.10")
    assert log_in(annotator, "bob", env["creds"]["bob"]).status_code == 200  # bob's browser gets its cookie
    assert "alignkit-device" in annotator.cookies
    for i in range(10):  # strangers at ten addresses, one guess each
        assert log_in(http_from(env["url"], f"127.0.1.{i + 1}"), "bob", "guess-123").status_code == 400
    stranger = log_in(http_from(env["url"], "127.0.2.1"), "bob", env["creds"]["bob"])
    assert stranger.status_code == 429 and "for this user name" in stranger.json()["detail"]
    annotator.post("/logout", headers={"origin": env["url"]})
    assert log_in(annotator, "bob", env["creds"]["bob"]).status_code == 200  # bob at his browser: in
    assert logged_in(annotator)
    # The cookie is bob's only: with it, another name is a stranger's login.
    other = http_from(env["url"], "127.0.2.2")
    other.cookies.set("alignkit-device", annotator.cookies["alignkit-device"])
    assert log_in(other, "bob", env["creds"]["bob"]).status_code == 200
    forged = http_from(env["url"], "127.0.2.3")
    forged.cookies.set("alignkit-device", annotator.cookies["alignkit-device"][:-2] + "00")
    assert log_in(forged, "bob", env["creds"]["bob"]).status_code == 429


def test_sessions_expire(tmp_path):
    db = make_store(str(tmp_path / "labels.db"), tmp_path, 2)
    creds = make_users(tmp_path / "users.json", ["ann"])
    server = Server(db, users=tmp_path / "users.json", extra=["--session-hours", "0.001"],
                    log=tmp_path / "server.log").start()  # 3.6 s
    try:
        c = http_from(server.url)
        assert log_in(c, "ann", creds["ann"]).status_code == 200 and logged_in(c)
        ann = client(server.url, ("ann", creds["ann"]))
        assert ann.predict(api_name="/progress")["done"] == 0
        time.sleep(3.8)
        assert not logged_in(c) and c.get("/alignkit/session").status_code == 401
        with pytest.raises(Exception):
            ann.predict(api_name="/next_item")
        assert log_in(c, "ann", creds["ann"]).status_code == 200 and logged_in(c)  # a new login works
    finally:
        server.stop()
