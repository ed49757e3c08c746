"""Helpers to build a label store and users file and run the real labeling server in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_prompts(path: Path, n: int, *, extra: list[dict] = ()) -> Path:
    """n prompts with two responses each (one comparison per prompt), plus `extra` rows."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Prompt {i}: say something **nice**.",
                                "responses": [f"short {i}", f"a longer answer number {i}" + "." * (i % 7)]}) + "\n")
        for row in extra:
            f.write(json.dumps(row) + "\n")
    return path


def make_store(db: str, tmp: Path, n: int, *, extra: list[dict] = ()) -> str:
    from alignkit.store import open_store
    from alignkit.store.importer import import_file

    store = open_store(db)
    import_file(store, write_prompts(tmp / f"prompts-{n}.jsonl", n, extra=extra))
    store.close()
    return db


def make_users(path: Path, names: list[str], *, admins: tuple[str, ...] = ()) -> dict[str, str]:
    """Write a users file (fast scrypt parameters are not used: the real ones); returns name -> password."""
    from labeling_ui.users import add_user

    creds = {name: f"pw-{name}-secret" for name in names}
    for name, pw in creds.items():
        add_user(path, name, pw, admin=name in admins)
    return creds


class Server:
    """`alignkit label serve` in a subprocess on a free loopback port.

    min_display: the server's --min-display-seconds; 0 by default, since test clients vote as soon as an
    item arrives (the browser tests and the refusal tests set the real minimum)."""

    def __init__(self, db: str, *, users: Path | None = None, overlap: int = 3, extra: list[str] = (),
                 log: Path | None = None, min_display: float = 0.0):
        self.db, self.users, self.overlap = db, users, overlap
        self.extra = ["--min-display-seconds", str(min_display), *extra]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "Server":
        cmd = [sys.executable, "-m", "alignkit.cli", "label", "serve", "--db", self.db, "--port", str(self.port),
               "--overlap", str(self.overlap), *self.extra]
        cmd += ["--users", str(self.users)] if self.users else ["--no-auth"]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextmanager
def running_server(db: str, **kwargs) -> Iterator[Server]:
    server = Server(db, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


def client(url: str, auth: tuple[str, str] | None):
    from gradio_client import Client

    return Client(url, auth=auth, verbose=False, download_files=False, ssl_verify=False)


def http_login(url: str, name: str, password: str) -> "httpx.Client":
    """A plain HTTP client logged in as `name` (Gradio's session cookie), for routes gradio_client does not call."""
    c = httpx.Client(base_url=url, timeout=30)
    r = c.post("/login", data={"username": name, "password": password})
    assert r.status_code == 200, r.text
    return c
