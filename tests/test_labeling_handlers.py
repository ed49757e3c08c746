"""Labeling app pieces without a server: handlers over a store, the users file, the label CLI."""

from __future__ import annotations

import json
import os
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
    assert alignkit_main(["label", "serve", "--db", str(tmp_path / "none.db"), "--no-auth"]) == 2
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
    with pytest.raises(SystemExit):
        label_main(["export", "--db", db, "--out", "x", "--ties", "coin-flip"])


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
