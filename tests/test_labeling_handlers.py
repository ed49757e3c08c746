"""Labeling app pieces without a server: handlers over a store, the users file, the label CLI."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat

import pytest

from alignkit.cli import main as alignkit_main
from alignkit.errors import UserError
from alignkit.store import open_store
from alignkit.store.agreement import load_votes
from labeling_ui import handlers
from labeling_ui.cli import main as label_main
from labeling_ui.users import UsersFile, add_user, hash_password, verify_password


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def store(tmp_path):
    from alignkit.store.importer import import_file

    s = open_store(tmp_path / "l.db", overlap=2)
    import_file(s, write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": f"p{i}", "responses": [f"x{i}", f"y{i}<b>"]} for i in range(3)]))
    yield s
    s.close()


def test_handlers_label_skip_undo_and_admin(store, tmp_path):
    view = handlers.current_view(store, "ann", overlap=2)
    assert view.comparison_id == 1 and "done 0, remaining 3" in view.progress
    assert "<b>" in view.left + view.right  # passed through as text; the UI shows it in a text box
    view = handlers.vote(store, "ann", view.comparison_id, "a", "why not", overlap=2)
    assert view.status.startswith("Saved #1") and view.comparison_id == 2 and "done 1" in view.progress
    view = handlers.vote(store, "ann", 1, "b", None, overlap=2)  # double vote: refused, view stays usable
    assert view.status.startswith("Not saved") and view.comparison_id == 2
    view = handlers.vote(store, "ann", 2, "left", None, overlap=2)
    assert "unknown choice" in view.status
    view = handlers.skip_item(store, "ann", 2, overlap=2)
    assert view.status == "Skipped #2." and view.comparison_id == 3 and "1 skipped" in view.progress
    view = handlers.undo(store, "ann", overlap=2)
    assert view.comparison_id == 1 and view.status.startswith("Undid")
    view = handlers.vote(store, "ann", 1, "tie", None, overlap=2)
    view = handlers.vote(store, "ann", view.comparison_id, "both_bad", None, overlap=2)
    assert view.done and "remaining 0" in view.progress
    handlers.vote(store, "bob", handlers.current_view(store, "bob", overlap=2).comparison_id, "b", None, overlap=2)
    admin = handlers.admin_view(store)
    assert "**3** votes" in admin.summary_markdown
    assert [row[0] for row in admin.annotators] == ["ann", "bob"]
    msg = handlers.admin_export(store, tmp_path / "exp", min_agreement=0.0, ties="ignore", both_bad="ignore")
    assert msg.startswith("Exported 1 preference rows")
    assert handlers.admin_export(store, tmp_path / "exp2", min_agreement=0.0, ties="drop", both_bad="drop") \
        .startswith("Export failed: nothing to export")


def test_build_app_wires_named_endpoints(store):
    from labeling_ui.app import build_app

    demo = build_app(store, overlap=2)
    names = {d.api_name for d in demo.fns.values() if d.api_visibility == "public"}
    assert {"next_item", "submit_vote", "skip", "undo_last_vote", "progress", "arena_next", "arena_vote",
            "leaderboard"} <= names
    assert all(d.api_name in names for d in demo.fns.values() if d.api_visibility == "public")
    assert demo._queue.default_concurrency_limit == 8 and not demo._queue.live_updates
    assert {d.concurrency_id for d in demo.fns.values()} == {"store"}  # one limit for all calls
    with pytest.raises(UserError, match="overlap"):
        build_app(store, overlap=0)


def test_refusals_are_one_line_errors_without_a_server_traceback(store):
    """Gradio prints a traceback for every gr.Error unless print_exception is off: a bad choice or a second vote
    filled the server log. Other exceptions are not wrapped, so Gradio still prints theirs."""
    import gradio as gr

    from labeling_ui.app import build_app

    demo = build_app(store, overlap=2)
    submit = next(d.fn for d in demo.fns.values() if d.api_name == "submit_vote")
    with pytest.raises(gr.Error, match="unknown choice 'left'") as refused:
        submit(1, "left", "", None)
    assert refused.value.print_exception is False


def test_serve_on_a_busy_port_is_one_line_and_touches_nothing(tmp_path, capsys):
    import socket

    db = tmp_path / "l.db"
    assert alignkit_main(["label", "import", "--db", str(db),
                          str(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "responses": ["a", "b"]}]))]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert alignkit_main(["label", "serve", "--db", str(db), "--no-auth", "--port", str(port)]) == 2
    assert capsys.readouterr().err == f"alignkit: error: port {port} on 127.0.0.1 is in use; choose another with --port\n"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_no_auth_only_on_loopback(store):
    from labeling_ui.app import build_app, is_loopback, launch

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(UserError, match="loopback"):
        launch(build_app(store), host="0.0.0.0", port=1)


def test_users_file_hashes_and_rereads(tmp_path):
    path = tmp_path / "users.json"
    assert add_user(path, "alice", "correct horse", admin=True) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = path.read_text()
    assert "correct horse" not in raw and json.loads(raw)["users"]["alice"]["kdf"] == "scrypt"
    users = UsersFile(path)
    assert users.check("alice", "correct horse") and not users.check("alice", "wrong horse")
    assert not users.check("nobody", "correct horse")
    assert users.is_admin("alice") and not users.is_admin(None)
    add_user(path, "bob", "another one")  # added while "serving": seen without a restart
    assert users.check("bob", "another one") and not users.is_admin("bob")
    add_user(path, "alice", "a new password")  # a password reset keeps the admin role (it silently removed it)
    assert users.is_admin("alice")
    add_user(path, "alice", "a new password", admin=False)
    assert not users.is_admin("alice")
    rec = hash_password("pw12345678")
    assert verify_password("pw12345678", rec) and not verify_password("pw12345679", rec)
    assert not verify_password("x", {"kdf": "md5"})
    with pytest.raises(UserError, match="too short"):
        add_user(path, "carol", "short")
    with pytest.raises(UserError, match="user name"):
        add_user(path, "../etc", "long enough pw")
    path.write_text("{broken")
    with pytest.raises(UserError, match="malformed JSON"):
        UsersFile(path)


def test_label_cli_import_add_user_export_stats(tmp_path, capsys):
    db = str(tmp_path / "l.db")
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "responses": ["a", "bb"]}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "bb"]}, "{oops"])
    # through the top-level CLI: one line, exit 2, and no store created from a bad file
    assert alignkit_main(["label", "import", "--db", db, str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"alignkit: error: {bad}:2: malformed JSON (Expecting property name enclosed in double quotes)"
    assert not os.path.exists(db)
    assert alignkit_main(["label", "import", "--db", db, str(good)]) == 0
    assert "1 comparisons" in capsys.readouterr().out
    users = tmp_path / "u.json"
    assert label_main(["add-user", "--users", str(users), "ann", "--password", "password1", "--admin"]) == 0
    assert alignkit_main(["label", "serve", "--db", db]) == 2  # no users file, no --no-auth
    assert "needs --users" in capsys.readouterr().err
    assert alignkit_main(["label", "serve", "--db", db, "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err
    with socket.socket() as busy:  # whatever listens on the port: a missing store is what is named
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert alignkit_main(["label", "serve", "--db", str(tmp_path / "none.db"), "--no-auth", "--port", port]) == 2
    assert "no label store" in capsys.readouterr().err

    from alignkit.store import next_item, submit_vote

    s = open_store(db)
    submit_vote(s, "ann", next_item(s, "ann").comparison_id, "tie")
    s.close()
    assert alignkit_main(["label", "export", "--db", db, "--out", str(tmp_path / "out")]) == 2
    assert "nothing to export" in capsys.readouterr().err
    assert alignkit_main(["label", "export", "--db", db, "--out", str(tmp_path / "out"), "--ties", "ignore"]) == 2
    assert alignkit_main(["label", "stats", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out)["n_votes"] == 1
    # Usage mistakes name the subcommand once (it read "alignkit: error: alignkit label export: ...").
    assert alignkit_main(["label", "export", "--db", db, "--out", "x", "--ties", "coin-flip"]) == 2
    assert capsys.readouterr().err.startswith("alignkit: error: label export: argument --ties: invalid choice: "
                                              "'coin-flip'")
    assert alignkit_main(["label", "serve", "--db", db, "--no-auth", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "alignkit: error: label serve: argument --port: must be between 1 and 65535, got 70000\n"
    # `alignkit label --help` lists the subcommands (it was "unrecognized arguments: --help"); none given names them.
    with pytest.raises(SystemExit) as exit_:
        alignkit_main(["label", "--help"])
    assert exit_.value.code == 0 and "{import,serve,add-user,export,simulate,exclude,stats}" in capsys.readouterr().out
    assert alignkit_main(["label"]) == 2
    assert "required: {import,serve,add-user,export,simulate,exclude,stats}" in capsys.readouterr().err
    # Export, stats and serve never turn another database into a store.
    other = tmp_path / "app.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE customers (x)")
    before = other.read_bytes()
    for argv in (["export", "--db", str(other), "--out", str(tmp_path / "o")], ["stats", "--db", str(other)]):
        assert alignkit_main(["label", *argv]) == 2
        assert "not an alignkit label store" in capsys.readouterr().err
    assert other.read_bytes() == before


def test_import_with_generate_records_model_and_sampling(tmp_path, tiny_model_dir):
    db = str(tmp_path / "g.db")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the film was"},
                                                 {"messages": [{"role": "user", "content": "describe the plot"}]}])
    assert label_main(["import", "--db", db, str(prompts), "--generate", str(tiny_model_dir),
                       "--max-new-tokens", "8", "--temperature", "1.0"]) == 0
    from sqlalchemy import select

    from alignkit.store.models import Response

    s = open_store(db, create=False)
    with s.read() as sess:
        responses = sess.scalars(select(Response)).all()
    s.close()
    assert len(responses) >= 3
    assert all(r.model_spec == str(tiny_model_dir) for r in responses)
    sampling = json.loads(responses[0].sampling_json)
    assert sampling["temperature"] == 1.0 and sampling["max_new_tokens"] == 8 and "sample_index" in sampling


def test_no_vote_from_handlers_without_lease(store):
    view = handlers.vote(store, "zed", 3, "a", None, overlap=2)
    assert "not assigned" in view.status
    assert load_votes(store) == []


def test_users_file_reread_on_atomic_replace_and_revokes_changed_users(tmp_path):
    path = tmp_path / "users.json"
    add_user(path, "alice", "first password")
    add_user(path, "bob", "bobs password")
    users = UsersFile(path)
    revoked = []
    users.on_revoke(revoked.append)
    assert users.check("alice", "first password")
    st = os.stat(path)
    add_user(path, "alice", "other password")  # same size; made to look like the same mtime tick
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_ino != st.st_ino
    assert users.check("alice", "other password") and not users.check("alice", "first password")
    assert revoked == [{"alice"}]
    data = json.loads(path.read_text())
    del data["users"]["bob"]
    path.write_text(json.dumps(data))
    assert "bob" not in users.users() and revoked == [{"alice"}, {"bob"}]


def test_unknown_names_cost_a_hash_like_known_ones(tmp_path, monkeypatch):
    import labeling_ui.users as users_mod

    path = tmp_path / "users.json"
    add_user(path, "alice", "right password")
    users = UsersFile(path)
    hashed = []
    real_verify = users_mod.verify_password
    monkeypatch.setattr(users_mod, "verify_password", lambda pw, rec: hashed.append(pw) or real_verify(pw, rec))
    assert not users.check("nobody", "x") and not users.check("alice", "wrong")
    assert users.check("alice", "right password")
    assert hashed == ["x", "wrong", "right password"]  # timing does not tell which names exist


def test_login_check_is_async_and_hashes_off_the_event_loop(tmp_path, monkeypatch):
    import asyncio
    import inspect
    import threading

    import labeling_ui.users as users_mod

    path = tmp_path / "users.json"
    add_user(path, "alice", "right password")
    users = UsersFile(path)
    # Gradio awaits `auth` on its event loop when it is a coroutine function, else calls it there.
    assert inspect.iscoroutinefunction(users.check_async)
    threads = []
    real_verify = users_mod.verify_password
    monkeypatch.setattr(users_mod, "verify_password",
                        lambda pw, rec: threads.append(threading.current_thread().name) or real_verify(pw, rec))

    async def logins():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        results = await asyncio.gather(*[users.check_async("alice", pw) for pw in ("right password", "x", "y", "z")])
        t.cancel()
        return results, ticks

    results, ticks = asyncio.run(logins())
    assert results == [True, False, False, False]
    assert len(threads) == 4 and all(name.startswith("alignkit-login") for name in threads)
    assert ticks > 4  # the loop kept running while the checks hashed


def test_sessions_of_removed_users_are_refused(tmp_path, store):
    import gradio as gr

    from labeling_ui.app import AppContext

    path = tmp_path / "users.json"
    add_user(path, "alice", "password one", admin=True)
    add_user(path, "bob", "password two")
    ctx = AppContext(store, 2, UsersFile(path), tmp_path / "exp")

    class Req:  # what the handlers read of a gr.Request
        def __init__(self, username):
            self.username = username

    assert ctx.user(Req("bob")) == "bob" and ctx.is_admin(Req("alice"))
    data = json.loads(path.read_text())
    del data["users"]["bob"], data["users"]["alice"]["admin"]
    path.write_text(json.dumps(data))
    with pytest.raises(gr.Error, match="no longer valid"):
        ctx.user(Req("bob"))
    assert not ctx.is_admin(Req("alice")) and not ctx.is_admin(Req("bob"))

    # The admin export takes a minimum of votes; with a minimum agreement, single votes are dropped.
    from alignkit.store import next_item, submit_vote

    for name, n in (("ann", 3), ("bob", 2)):  # comparisons 1 and 2 get two agreeing votes, 3 gets one
        for _ in range(n):
            item = next_item(store, name)
            submit_vote(store, name, item.comparison_id, "b" if item.swapped else "a")
    msg = handlers.admin_export(store, tmp_path / "e1", min_agreement=0.0, ties="drop", both_bad="drop", min_votes=2)
    assert msg.startswith("Exported 2 preference rows") and "'too_few_votes': 1" in msg
    msg = handlers.admin_export(store, tmp_path / "e2", min_agreement=0.5, ties="drop", both_bad="drop", min_votes=1)
    assert "'single_vote': 1" in msg
    assert handlers.admin_export(store, tmp_path / "e3", min_agreement=0.0, ties="drop", both_bad="drop",
                        min_votes=None).startswith("Export failed: min votes must be an integer")


def test_simulated_annotator_stops_when_votes_keep_being_refused(monkeypatch):
    from gradio_client.exceptions import AppError

    import labeling_ui.simulate as simulate

    class Refusing:  # a server that keeps serving one item and refusing every vote on it
        votes = 0

        def predict(self, api_name, **kwargs):
            if api_name == "/next_item":
                return 7, "prompt", "left", "right"
            Refusing.votes += 1
            raise AppError("the lease on comparison 7 expired and it went to other annotators")

        def close(self):
            pass

    monkeypatch.setattr(simulate, "connect", lambda url, auth: Refusing())
    result = simulate.run_simulated_annotators("http://x", [("ann", "pw")], simulate.length_judge)
    assert Refusing.votes == simulate.MAX_REFUSED_IN_A_ROW
    assert result["votes"] == 0 and result["stopped"] == ["ann"] and len(result["errors"]) == 5
