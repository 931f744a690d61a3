"""Run ``dagster dev`` against a temporary instance, and talk to it over GraphQL, for the UI tests.

The server binds 127.0.0.1 on a free port, runs in its own process group (``dagster dev`` starts the
webserver, the daemon and a code server as children) and is stopped with SIGINT to the whole group, so no
child outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCATION = "castlora"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DagsterDev:
    """A running ``dagster dev``; ``url`` is its web root, ``log`` its combined stdout/stderr."""

    process: subprocess.Popen
    url: str
    log: Path

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors from {self.url}/graphql: {payload['errors']}")
        return payload["data"]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGINT)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait(timeout=10)
        # dagster dev's children share the group; make sure none is left behind after it exits.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


WORKSPACE_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace { locationEntries { name loadStatus locationOrLoadError { __typename
      ... on PythonError { message } } } }
  }
}
"""


def start_dagster_dev(
    dagster_home: Path,
    data_home: Path,
    log: Path,
    startup_timeout: float = 240,
    extra_env: dict[str, str] | None = None,
) -> DagsterDev:
    """Start ``dagster dev`` on the instance at ``dagster_home`` and wait until the code location is loaded;
    ``extra_env`` adds deployment settings (e.g. ``CASTLORA_EXECUTOR``) to its environment."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "CASTLORA_"))}
    env.update(
        DAGSTER_HOME=str(dagster_home),
        CASTLORA_HOME=str(data_home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DAGSTER_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env or {})
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = DagsterDev(process=process, url=f"http://127.0.0.1:{port}", log=log)
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"dagster dev exited with {process.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"dagster dev not ready after {startup_timeout:.0f} s:\n{server.log_tail()}")
            if _location_loaded(server):
                return server
            time.sleep(1)
    except BaseException:
        server.stop()
        raise


def _location_loaded(server: DagsterDev) -> bool:
    try:
        with urllib.request.urlopen(f"{server.url}/server_info", timeout=5):
            pass
        entries = server.graphql(WORKSPACE_QUERY, timeout=10)["workspaceOrError"]["locationEntries"]
    except (urllib.error.URLError, ConnectionError, TimeoutError, AssertionError, KeyError):
        return False
    for entry in entries:
        if entry["name"] != LOCATION or entry["loadStatus"] != "LOADED":
            continue
        loaded = entry["locationOrLoadError"] or {}
        if loaded.get("__typename") == "PythonError":
            raise AssertionError(f"code location {LOCATION!r} failed to load: {loaded.get('message')}")
        return True
    return False
