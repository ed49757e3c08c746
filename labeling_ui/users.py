"""The users file: annotators with salted scrypt password hashes and an admin flag, as JSON.

    {"version": 1,
     "users": {"alice": {"kdf": "scrypt", "n": 16384, "r": 8, "p": 1,
                         "salt": "<hex>", "hash": "<hex>", "admin": false}}}

Written atomically with mode 0600, under a lock (`.NAME.lock` beside it) that `add-user` and the
admin tab's user management share. The server reads it again when it changes, so users can be
added, disabled (`"disabled": true`: no login, sessions end) or re-passworded while it runs. Passwords are compared with
`hmac.compare_digest`; the file never holds a password.

Logins: Gradio awaits `UsersFile.check_async` on its event loop, which runs the scrypt
check (~60 ms of CPU) on a small pool of its own, so a flood of logins neither stalls
the loop nor takes more than LOGIN_WORKERS cores from the annotators. Throttling (per
client address and per name, with back-off) happens before this check, in guard.py,
where the client's address is known; Gradio hands this check no request.

scrypt cost stays n=2**14: each record carries its own parameters, so it can be raised
for new passwords later, but a higher cost makes every login (and the flood above) dearer.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from alignkit.errors import UserError

SCRYPT = {"n": 2**14, "r": 8, "p": 1}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 8
T = TypeVar("T")
LOGIN_WORKERS = 2  # scrypt checks at once; more logins wait their turn off the event loop


def hash_password(password: str, *, salt: bytes | None = None, n: int = SCRYPT["n"], r: int = SCRYPT["r"],
                  p: int = SCRYPT["p"]) -> dict:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    return {"kdf": "scrypt", "n": n, "r": r, "p": p, "salt": salt.hex(), "hash": digest.hex()}


def verify_password(password: str, record: dict) -> bool:
    if record.get("kdf") != "scrypt":
        return False
    try:
        expected = bytes.fromhex(record["hash"])
        digest = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(record["salt"]), n=int(record["n"]),
                                r=int(record["r"]), p=int(record["p"]), dklen=len(expected))
    except (KeyError, ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"users file not found: {path} (create it with `alignkit label add-user --users {path} NAME`)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"users file {path}: malformed JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
        raise UserError(f"users file {path}: expected an object with a `users` object")
    return data


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock on a users file's writers (flock on a side file `.NAME.lock`, across threads and
    processes): `add-user` and the admin tab read, change and replace the file in turns, so neither
    writes back a copy that lacks the other's change."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"users file {path} is a directory")
    if not path.parent.is_dir():
        raise UserError(f"cannot write users file {path}: directory {path.parent} does not exist")


def _update(path: str | Path, change: Callable[[dict], T]) -> T:
    """Read the users file (or an empty one), apply `change` to its `users` object, write it back atomically
    (mode 0600, a temp file renamed over it), all under the writers' lock. A `change` that raises writes
    nothing. The server sees the new file at its next request (UsersFile re-reads on a changed inode)."""
    path = Path(path)
    _check_path(path)
    with _locked(path):
        data = _read(path) if path.exists() else {"version": 1, "users": {}}
        result = change(data["users"])
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return result


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UserError(f"user name {name!r}: use 1-64 letters, digits, _ . @ - (starting with a letter or digit)")
    return name


def check_password(name: str, password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise UserError(f"password for {name} is too short (at least {MIN_PASSWORD} characters)")
    return password


def add_user(path: str | Path, name: str, password: str, *, admin: bool | None = None) -> bool:
    """Add a user or set a new password; returns True when the user is new. Creates the file (0600) if needed.
    admin=None keeps an existing user's admin flag (a password reset does not demote an admin); new: not admin.
    A disabled user stays disabled (enable them with set_user)."""
    check_name(name)
    check_password(name, password)

    def change(users: dict) -> bool:
        old = users.get(name, {})
        keep_admin = bool(old.get("admin", False)) if admin is None else bool(admin)
        users[name] = {**old, **hash_password(password), "admin": keep_admin}
        return not old

    return _update(path, change)


def set_user(path: str | Path, name: str, *, disabled: bool | None = None, admin: bool | None = None) -> dict:
    """Disable or enable an existing user, make them an admin or not (None: left as it is); their record.
    A disabled user cannot log in and their open sessions end at their next request; nothing else changes."""

    def change(users: dict) -> dict:
        if name not in users:
            raise UserError(f"no user {name!r} in {path}")
        record = users[name]
        if disabled is not None:
            record["disabled"] = bool(disabled)
        if admin is not None:
            record["admin"] = bool(admin)
        return dict(record)

    return _update(path, change)


def is_disabled(record: dict) -> bool:
    return bool(record.get("disabled", False))


@dataclass
class _Snapshot:
    key: tuple[int, int, int]  # (st_ino, st_mtime_ns, st_size): an atomic replace changes the inode
    everyone: dict  # every record, disabled ones too
    users: dict  # the users who may log in


def _credential(record: dict | None) -> tuple | None:
    return None if record is None else (record.get("salt"), record.get("hash"))


class UsersFile:
    """Login checks against a users file, re-read whenever it changes on disk (thread-safe).

    When a re-read finds a user removed or their password changed, the functions registered with
    `on_revoke` are called with those names (the app ends their sessions) before anyone is checked
    against the new file."""

    def __init__(self, path: str | Path, *, login_workers: int = LOGIN_WORKERS):
        self.path = Path(path).resolve()
        self._lock = threading.Lock()
        self._snap: _Snapshot | None = None
        self._revoke_hooks: list[Callable[[set[str]], None]] = []
        self._login_pool = ThreadPoolExecutor(max_workers=login_workers, thread_name_prefix="alignkit-login")
        if not self.users():
            raise UserError(f"users file {self.path} has no users (add one with `alignkit label add-user`)")

    def on_revoke(self, fn: Callable[[set[str]], None]) -> None:
        self._revoke_hooks.append(fn)

    def users(self) -> dict:
        """The users who may log in (disabled ones left out), re-read when the file changed; a user removed,
        disabled or given a new password since the last read has their sessions ended (on_revoke) first."""
        st = self.path.stat() if self.path.exists() else None
        revoked: set[str] = set()
        with self._lock:
            if st is None:
                if self._snap is None:
                    _read(self.path)  # raises "not found"
                return self._snap.users
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._snap is None or key != self._snap.key:
                everyone = _read(self.path)["users"]
                new = {n: rec for n, rec in everyone.items() if not is_disabled(rec)}
                if self._snap is not None:
                    revoked = {n for n, rec in self._snap.users.items() if _credential(new.get(n)) != _credential(rec)}
                self._snap = _Snapshot(key, everyone, new)
            users = self._snap.users
        for fn in self._revoke_hooks if revoked else ():
            fn(revoked)
        return users

    def everyone(self) -> dict:
        """Every record in the file, disabled users too (the admin tab lists them)."""
        self.users()
        with self._lock:
            return dict(self._snap.everyone)

    def check(self, username: str, password: str) -> bool:
        """True when the name exists and the password matches."""
        record = self.users().get(username)
        if record is None:
            # Spend the same time as a real check, so timing does not tell which user names exist.
            verify_password(password, {"kdf": "scrypt", **SCRYPT, "salt": "00" * 16, "hash": "00" * 32})
            ok = False
        else:
            ok = verify_password(password, record)
        return ok

    async def check_async(self, username: str, password: str) -> bool:
        """Gradio's `auth` callable: awaited on the event loop, so the hashing runs on the login pool."""
        return await asyncio.get_running_loop().run_in_executor(self._login_pool, self.check, username, password)

    def is_admin(self, username: str | None) -> bool:
        return bool(username) and bool(self.users().get(username, {}).get("admin", False))
