"""A throwaway PostgreSQL cluster for tests: initdb in a temp dir, on a free port, stopped afterwards.

Debian's `postgresql` package provides the binaries (/usr/lib/postgresql/*/bin).
initdb refuses to run as root, so as root the cluster is created and run as the
`postgres` user through `runuser -u postgres --`. When the binaries are missing
the tests that need the server are skipped with a loud reason, never silently.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def pg_bin_dir() -> Path | None:
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(cand, "initdb")) and os.path.exists(os.path.join(cand, "pg_ctl")):
            return Path(cand)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        pytest.skip("PostgreSQL tests SKIPPED: running as root and `runuser` is missing (initdb refuses root)")
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Yield a postgresql+psycopg:// URL of a fresh cluster's `postgres` database (user postgres, trust auth)."""
    bindir = pg_bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL tests SKIPPED: no initdb/pg_ctl found; install Debian's `postgresql` package "
                    "(apt-get install -y postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL tests SKIPPED: psycopg is not installed (pip install 'alignkit[postgres]')")
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL tests SKIPPED: running as root and there is no `postgres` user")
    root = Path(tempfile.mkdtemp(prefix="alignkit-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    log = root / "server.log"
    try:
        subprocess.run(_as_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                 "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        opts = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off -c max_connections=300"
        subprocess.run(_as_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w",
                                 "start"]), check=True, capture_output=True)
    except subprocess.CalledProcessError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL tests SKIPPED: could not start a cluster: {err.stderr.decode(errors='replace')[-500:]}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    try:
        yield url
    finally:
        subprocess.run(_as_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


_db_counter = [0]


def create_database(url: str) -> str:
    """A new empty database in the cluster at `url`; returns its URL."""
    import psycopg

    _db_counter[0] += 1
    name = f"t{os.getpid()}_{_db_counter[0]}_{int(time.time() * 1000) % 100000}"
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name
