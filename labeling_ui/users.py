"""The users file: annotators with salted scrypt password hashes and an admin flag, as JSON.

    {"version": 1,
     "users": {"alice": {"kdf": "scrypt", "n": 16384, "r": 8, "p": 1,
                         "salt": "<hex>", "hash": "<hex>", "admin": false}}}

Written atomically with mode 0600. The server reads it again when it changes, so
`alignkit label add-user` works while the server runs. Passwords are compared with
`hmac.compare_digest`; the file never holds a password.

Logins: Gradio awaits `UsersFile.check_async` on its event loop, which runs the scrypt
check (~60 ms of CPU) on a small pool of its own, so a flood of logins neither stalls
the loop nor takes more than LOGIN_WORKERS cores from the annotators. A user name with
MAX_FAILED_LOGINS failures within FAILED_LOGIN_WINDOW_S is refused without hashing until
the oldest of them ages out (for every name, known or not, so it tells no one which
names exist). Gradio hands the check no request, so there is no limit per client address.

scrypt cost stays n=2**14: each record carries its own parameters, so it can be raised
for new passwords later, but a higher cost makes every login (and the flood above) dearer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from alignkit.errors import UserError

SCRYPT = {"n": 2**14, "r": 8, "p": 1}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 8
MAX_FAILED_LOGINS = 10
FAILED_LOGIN_WINDOW_S = 600.0
LOGIN_WORKERS = 2  # scrypt checks at once; more logins wait their turn off the event loop
MAX_TRACKED_NAMES = 10_000  # names with recent failures remembered (random names cannot grow it unbounded)


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


def add_user(path: str | Path, name: str, password: str, *, admin: bool | None = None) -> bool:
    """Add or replace a user; returns True when the user is new. Creates the file (0600) if needed.
    admin=None keeps an existing user's admin flag (a password reset does not demote an admin); new: not admin."""
    path = Path(path)
    if not NAME_RE.match(name or ""):
        raise UserError(f"user name {name!r}: use 1-64 letters, digits, _ . @ - (starting with a letter or digit)")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password for {name} is too short (at least {MIN_PASSWORD} characters)")
    if path.is_dir():
        raise UserError(f"users file {path} is a directory")
    if not path.parent.is_dir():
        raise UserError(f"cannot write users file {path}: directory {path.parent} does not exist")
    data = _read(path) if path.exists() else {"version": 1, "users": {}}
    new = name not in data["users"]
    if admin is None:
        admin = bool(data["users"].get(name, {}).get("admin", False))
    data["users"][name] = {**hash_password(password), "admin": bool(admin)}
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
    return new


@dataclass
class _Snapshot:
    key: tuple[int, int, int]  # (st_ino, st_mtime_ns, st_size): an atomic replace changes the inode
    users: dict


def _credential(record: dict | None) -> tuple | None:
    return None if record is None else (record.get("salt"), record.get("hash"))


class LoginLimiter:
    """Failed logins per user name in a sliding window: a name with `max_failures` failures in the last
    `window` seconds is blocked until the oldest of them ages out. Thread-safe."""

    def __init__(self, max_failures: int = MAX_FAILED_LOGINS, window: float = FAILED_LOGIN_WINDOW_S, *,
                 clock: Callable[[], float] = time.monotonic, max_names: int = MAX_TRACKED_NAMES):
        self.max_failures, self.window, self.clock, self.max_names = max_failures, window, clock, max_names
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}  # oldest-updated first

    def blocked(self, name: str) -> bool:
        with self._lock:
            recent = self._recent(name, self.clock())
            return recent is not None and len(recent) >= self.max_failures

    def record(self, name: str, ok: bool) -> None:
        with self._lock:
            if ok:
                self._failures.pop(name, None)
                return
            now = self.clock()
            recent = self._recent(name, now) or deque(maxlen=self.max_failures)
            recent.append(now)
            if len(recent) == self.max_failures:  # the admin should know why a right password is refused now
                print(f"alignkit label: {name!r} is locked out after {self.max_failures} failed logins within "
                      f"{self.window:.0f} s; logins as {name!r} are refused until the oldest ages out",
                      file=sys.stderr, flush=True)
            self._failures.pop(name, None)
            self._failures[name] = recent  # most recently failed last
            while len(self._failures) > self.max_names:
                del self._failures[next(iter(self._failures))]

    def _recent(self, name: str, now: float) -> deque[float] | None:
        recent = self._failures.get(name)
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if recent is not None and not recent:
            del self._failures[name]
            return None
        return recent


class UsersFile:
    """Login checks against a users file, re-read whenever it changes on disk (thread-safe).

    When a re-read finds a user removed or their password changed, the functions registered with
    `on_revoke` are called with those names (the app ends their sessions) before anyone is checked
    against the new file."""

    def __init__(self, path: str | Path, *, limiter: LoginLimiter | None = None, login_workers: int = LOGIN_WORKERS):
        self.path = Path(path).resolve()
        self.limiter = limiter or LoginLimiter()
        self._lock = threading.Lock()
        self._snap: _Snapshot | None = None
        self._revoke_hooks: list[Callable[[set[str]], None]] = []
        self._login_pool = ThreadPoolExecutor(max_workers=login_workers, thread_name_prefix="alignkit-login")
        if not self.users():
            raise UserError(f"users file {self.path} has no users (add one with `alignkit label add-user`)")

    def on_revoke(self, fn: Callable[[set[str]], None]) -> None:
        self._revoke_hooks.append(fn)

    def users(self) -> dict:
        st = self.path.stat() if self.path.exists() else None
        revoked: set[str] = set()
        with self._lock:
            if st is None:
                if self._snap is None:
                    _read(self.path)  # raises "not found"
                return self._snap.users
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._snap is None or key != self._snap.key:
                new = _read(self.path)["users"]
                if self._snap is not None:
                    revoked = {n for n, rec in self._snap.users.items() if _credential(new.get(n)) != _credential(rec)}
                self._snap = _Snapshot(key, new)
            users = self._snap.users
        for fn in self._revoke_hooks if revoked else ():
            fn(revoked)
        return users

    def check(self, username: str, password: str) -> bool:
        """True when the name exists and the password matches (and the name is not blocked by failures)."""
        if self.limiter.blocked(username):
            return False
        record = self.users().get(username)
        if record is None:
            # Spend the same time as a real check, so timing does not tell which user names exist.
            verify_password(password, {"kdf": "scrypt", **SCRYPT, "salt": "00" * 16, "hash": "00" * 32})
            ok = False
        else:
            ok = verify_password(password, record)
        self.limiter.record(username, ok)
        return ok

    async def check_async(self, username: str, password: str) -> bool:
        """Gradio's `auth` callable: awaited on the event loop, so the hashing runs on the login pool."""
        if self.limiter.blocked(username):  # refused at once: no thread, no hashing
            return False
        return await asyncio.get_running_loop().run_in_executor(self._login_pool, self.check, username, password)

    def is_admin(self, username: str | None) -> bool:
        return bool(username) and bool(self.users().get(username, {}).get("admin", False))
