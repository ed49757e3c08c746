"""The admin who can act, through the real server: users, progress per annotator and round, the export as a
download, and the Arena's undo before the reveal. Every admin function refuses an annotator who is not one."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
import zipfile

import httpx
import pytest
from gradio_client.exceptions import AppError
from sqlalchemy import update

from _labeling_server import Server, client, http_login, make_users, write_prompts
from alignkit.cli import main as alignkit_main
from alignkit.store import open_store
from alignkit.store.models import Comparison
from labeling_ui.users import add_user, set_user


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from alignkit.store.importer import ImportRow, write_rows

    tmp = tmp_path_factory.mktemp("labeling-admin")
    db = str(tmp / "labels.db")
    assert alignkit_main(["label", "import", "--db", db, str(write_prompts(tmp / "p.jsonl", 6))]) == 0
    store = open_store(db)
    write_rows(store, [ImportRow(prompt=f"battle {i}", source=f"compare {i}",
                                 responses=[f"alpha says {i}", f"beta says {i}"], models=["/m/alpha", "/m/beta"],
                                 sampling=[{"model_name": "alpha"}, {"model_name": "beta"}]) for i in range(2)],
               arena=True)
    # Comparisons 1-3 came from loop round 1, 4-6 from round 2 (as `alignkit loop` tags them).
    store.write(lambda s: [s.execute(update(Comparison).where(Comparison.id <= 3).values(loop_round=1)),
                           s.execute(update(Comparison).where(Comparison.id.between(4, 6)).values(loop_round=2))])
    store.close()
    users = tmp / "users.json"
    creds = make_users(users, ["lead", "ann", "bob"], admins=("lead",))
    server = Server(db, users=users, overlap=2, log=tmp / "server.log").start()
    try:
        yield {"db": db, "users": users, "creds": creds, "url": server.url, "tmp": tmp}
    finally:
        server.stop()


def as_user(served, name, password=None):
    return client(served["url"], (name, password or served["creds"][name]))


ADMIN_CALLS = [dict(api_name="/admin_progress"), dict(api_name="/admin_users"),
               dict(action="add", name="mallory", password="mallory-pw-1", admin=True, api_name="/admin_user"),
               dict(api_name="/admin_export"), dict(api_name="/admin_stats")]


def test_every_admin_function_refuses_an_annotator(served):
    ann = as_user(served, "ann")
    for call in ADMIN_CALLS:
        with pytest.raises(AppError, match="admins only"):
            ann.predict(**call)
    assert "mallory" not in json.loads(served["users"].read_text())["users"]  # nothing was written
    # The download: 403 for an annotator's session, 401 without one, and nothing of the export in either.
    r = http_login(served["url"], "ann", served["creds"]["ann"]).get("/alignkit/export.zip")
    assert r.status_code == 403 and r.json()["detail"] == "admins only"
    assert httpx.get(served["url"] + "/alignkit/export.zip").status_code == 401


def test_admin_manages_users_through_the_users_file_while_serving(served):
    lead = as_user(served, "lead")
    out = lead.predict(action="add", name="erin", password="erin-first-pw", admin=False, api_name="/admin_user")
    assert out["done"] == "erin added." and ["erin", "no", "yes"] in out["users"]
    assert stat.S_IMODE(os.stat(served["users"]).st_mode) == 0o600
    erin = as_user(served, "erin", "erin-first-pw")
    assert isinstance(erin.predict(api_name="/next_item")[0], int)  # logs in and is served
    with pytest.raises(AppError, match="already exists"):
        lead.predict(action="add", name="erin", password="another-pw", api_name="/admin_user")
    with pytest.raises(AppError, match="too short"):
        lead.predict(action="reset_password", name="erin", password="short", api_name="/admin_user")
    # A new password ends erin's session; the new one works, the old one not.
    lead.predict(action="reset_password", name="erin", password="erin-second-pw", api_name="/admin_user")
    with pytest.raises(Exception):
        erin.predict(api_name="/progress")
    with pytest.raises(Exception):
        as_user(served, "erin", "erin-first-pw")
    erin = as_user(served, "erin", "erin-second-pw")
    # Disabled: the session ends and no login works; enabled: the same password works again.
    assert ["erin", "no", "no (disabled)"] in lead.predict(action="disable", name="erin", api_name="/admin_user")["users"]
    with pytest.raises(Exception):
        erin.predict(api_name="/progress")
    with pytest.raises(Exception):
        as_user(served, "erin", "erin-second-pw")
    lead.predict(action="enable", name="erin", api_name="/admin_user")
    assert as_user(served, "erin", "erin-second-pw").predict(api_name="/progress")["done"] == 0
    # Admin or not: bob becomes one (and may act), then is one no more; nobody disables or demotes themselves.
    lead.predict(action="make_admin", name="bob", api_name="/admin_user")
    assert ["lead", "yes", "yes"] in as_user(served, "bob").predict(api_name="/admin_users")
    lead.predict(action="remove_admin", name="bob", api_name="/admin_user")
    with pytest.raises(AppError, match="admins only"):
        as_user(served, "bob").predict(api_name="/admin_users")
    for action in ("disable", "remove_admin"):
        with pytest.raises(AppError, match="cannot disable yourself or remove your own admin"):
            lead.predict(action=action, name="lead", api_name="/admin_user")
    with pytest.raises(AppError, match="no user 'nobody'"):
        lead.predict(action="disable", name="nobody", api_name="/admin_user")
    with pytest.raises(AppError, match="unknown action"):
        lead.predict(action="delete", name="bob", api_name="/admin_user")
    records = json.loads(served["users"].read_text())["users"]
    assert not records["lead"].get("disabled") and records["lead"]["admin"] and not records["bob"]["admin"]


def test_add_user_and_the_admin_take_turns_on_the_users_file(tmp_path):
    """Writers in two threads (the CLI's add-user and the admin tab's changes): every change survives."""
    path = tmp_path / "users.json"
    add_user(path, "root", "root-password")
    errors = []

    def writer(prefix):
        try:
            for i in range(6):
                add_user(path, f"{prefix}{i}", "a-password")
                set_user(path, "root", admin=(i % 2 == 0))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(p,)) for p in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    names = set(json.loads(path.read_text())["users"])
    assert names == {"root", *(f"{p}{i}" for p in "xy" for i in range(6))}


def test_progress_per_annotator_and_round_is_computed_when_asked(served):
    lead = as_user(served, "lead")
    before = {row[0]: row for row in lead.predict(api_name="/admin_progress")["rows"]}
    bob = as_user(served, "bob")
    for _ in range(4):  # comparisons 1-4: three of round 1, one of round 2
        cid = bob.predict(api_name="/next_item")[0]
        bob.predict(comparison_id=cid, choice="a", api_name="/submit_vote")
    bob.predict(comparison_id=bob.predict(api_name="/next_item")[0], api_name="/skip")
    table = lead.predict(api_name="/admin_progress")
    assert table["columns"][-2:] == ["round 1", "round 2"]
    row = dict(zip(table["columns"], {r[0]: r for r in table["rows"]}["bob"]))
    assert (row["votes"], row["skipped"], row["round 1"], row["round 2"]) == (4, 1, 3, 1)
    assert row["last vote"].endswith("s ago") and "bob" not in before  # a fresh count, not a snapshot


def test_export_is_a_download_for_admins_with_its_policy(served):
    ann = as_user(served, "ann")
    cid = ann.predict(api_name="/next_item")[0]
    ann.predict(comparison_id=cid, choice="b", api_name="/submit_vote")
    lead = as_user(served, "lead")
    with pytest.raises(AppError, match="ties policy 'maybe'"):
        lead.predict(ties="maybe", api_name="/admin_export")
    out = lead.predict(min_agreement=0.0, ties="drop", both_bad="drop", min_votes=1, api_name="/admin_export")
    assert out["download"] == "/alignkit/export.zip" and out["policy"]["ties"] == "drop" and out["rows"] >= 1
    r = http_login(served["url"], "lead", served["creds"]["lead"]).get(out["download"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"].startswith("attachment; filename=")
    z = zipfile.ZipFile(io.BytesIO(r.content))
    names = {n.split("/", 1)[1] for n in z.namelist()}
    assert {"preferences.jsonl", "export.json", "dataset_info.json", "state.json"} <= names
    assert any(n.endswith(".arrow") for n in names)  # the save_to_disk directory itself
    top = z.namelist()[0].split("/", 1)[0]
    policy = json.loads(z.read(f"{top}/export.json"))["policy"]
    assert (policy["min_agreement"], policy["ties"], policy["min_votes"]) == (0.0, "drop", 1)
    rows = [json.loads(line) for line in z.read(f"{top}/preferences.jsonl").decode().splitlines()]
    assert len(rows) == out["rows"]


def test_arena_vote_can_be_taken_back_until_the_reveal(served):
    bob = as_user(served, "bob")
    cid, prompt, a, b = bob.predict(api_name="/arena_next")
    voted = bob.predict(comparison_id=cid, choice="a", reveal=False, api_name="/arena_vote")
    assert (voted["model_a"], voted["model_b"]) == (None, None)
    again = bob.predict(api_name="/arena_undo")
    assert (again[0], again[2]) == (cid, a)  # the same battle, the same sides
    bob.predict(comparison_id=cid, choice="b", reveal=False, api_name="/arena_vote")
    shown = bob.predict(comparison_id=cid, api_name="/arena_reveal")
    assert shown["choice"] == "b" and {shown["model_a"], shown["model_b"]} == {"alpha", "beta"}
    assert shown["model_a"] == ("alpha" if a.startswith("alpha") else "beta")
    with pytest.raises(AppError, match="cannot be taken back after the reveal"):
        bob.predict(api_name="/arena_undo")
    with pytest.raises(AppError, match="has not voted on comparison"):
        as_user(served, "ann").predict(comparison_id=cid, api_name="/arena_reveal")
