"""A real PostgreSQL server for the tests: ``postgres_url`` (session-scoped) starts one on 127.0.0.1.

initdb/pg_ctl come from the Debian ``postgresql`` package (``apt-get install postgresql``); they refuse to
run as root, so as root they run as the ``postgres`` system user on a data dir that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = "install it with `apt-get install postgresql` (Debian/Ubuntu) or put initdb/pg_ctl on PATH"
DATABASE = "castlora"
READY_TIMEOUT_S = 30.0


def find_postgres_bin() -> Path:
    """The folder with initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin, else wherever PATH's initdb lives."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name.split(".")[0]), reverse=True
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))  # resolve: /usr/local/bin may hold only symlinks
    for folder in candidates:
        if all((Path(folder) / name).is_file() for name in ("initdb", "pg_ctl", "pg_isready", "createdb")):
            return Path(folder)
    raise FileNotFoundError(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {INSTALL_HINT}.")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One throw-away cluster: trust auth on 127.0.0.1 only, fsync off, socket in its own temp dir."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.as_postgres_user = os.geteuid() == 0
        self.user = "postgres" if self.as_postgres_user else pwd.getpwuid(os.geteuid()).pw_name
        self.root = Path(tempfile.mkdtemp(prefix="castlora-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_postgres_user:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def _check(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr[-2000:]}\n{log}")

    def start(self) -> None:
        if self.as_postgres_user:
            self.root.chmod(0o755)
            shutil.chown(self.root, "postgres", "postgres")
        self._check(self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync"), "initdb")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        options += " -c synchronous_commit=off -c max_connections=100"
        started = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        self._check(started, "pg_ctl start")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            ready = self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), timeout=10)
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                self._check(ready, f"pg_isready after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        self.create_database(DATABASE)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """A new empty database on this server; returns its URL."""
        created = self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        self._check(created, f"createdb {name}")
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole session; fails (never skips) when PostgreSQL is missing."""
    try:
        bin_dir = find_postgres_bin()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of the session's ``castlora`` database (shared by every test that uses it)."""
    return postgres_server.url


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> str:
    """URL of a new, empty database for one test (Dagster's tables are created on first use)."""
    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:12]}")
