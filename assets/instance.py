"""The Dagster instance config (``$DAGSTER_HOME/dagster.yaml``), rendered in one place from settings.

sqlite by default, Postgres when ``CASTLORA_POSTGRES_URL`` is set; the ``gpu`` pool limited to
``CASTLORA_GPU_SLOTS`` concurrent steps (every run, backfills included, claims a slot per GPU step);
killed runs re-executed up to ``CASTLORA_RUN_RETRIES`` times, user errors not; telemetry off.

``python -m assets.instance DAGSTER_HOME`` writes it (``make ui`` does); the CLI calls ``ensure_instance``.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from assets.compute import GPU_POOL
from pipeline.errors import CastloraError
from pipeline.storage.atomic import write_text_atomic

POSTGRES_URL_VAR = "CASTLORA_POSTGRES_URL"
GPU_SLOTS_VAR = "CASTLORA_GPU_SLOTS"
RUN_RETRIES_VAR = "CASTLORA_RUN_RETRIES"
CONFIG_FILENAME = "dagster.yaml"
LOCK_FILENAME = ".castlora-instance.lock"
# dagster-postgres connects through SQLAlchemy with psycopg2, so the URL names that driver.
POSTGRES_SCHEME = "postgresql+psycopg2://"


@dataclass(frozen=True)
class InstanceSettings:
    gpu_slots: int = 1
    postgres_url: str = ""  # empty: sqlite under DAGSTER_HOME
    run_retries: int = 2

    def __post_init__(self) -> None:
        if self.gpu_slots < 1:
            raise CastloraError(f"{GPU_SLOTS_VAR} must be at least 1 (got {self.gpu_slots}).")
        if self.run_retries < 0:
            raise CastloraError(f"{RUN_RETRIES_VAR} must be 0 or more (got {self.run_retries}).")
        if self.postgres_url and not self.postgres_url.startswith(POSTGRES_SCHEME):
            # Never echo the URL: it usually carries a password.
            raise CastloraError(
                f"{POSTGRES_URL_VAR} must look like {POSTGRES_SCHEME}user:password@host:5432/db "
                "(SQLAlchemy 2.1 reads a bare postgresql:// as the psycopg 3 driver, which is not installed)."
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> InstanceSettings:
        env = os.environ if env is None else env
        return cls(
            gpu_slots=env_int(env, GPU_SLOTS_VAR, 1),
            postgres_url=env.get(POSTGRES_URL_VAR, "").strip(),
            run_retries=env_int(env, RUN_RETRIES_VAR, 2),
        )


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole-number setting from the environment (empty or unset: ``default``); refuses anything else by name."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise CastloraError(f"{name} must be a whole number (got {raw!r}).") from None


def render_instance_config(settings: InstanceSettings) -> dict[str, Any]:
    """The ``dagster.yaml`` content as a dict; a Postgres URL is referenced by env var, never written."""
    config: dict[str, Any] = {
        "telemetry": {"enabled": False},
        "concurrency": {
            # op granularity: each GPU step claims a slot when it starts, whichever run (or backfill) it is in.
            # dagster.yaml cannot name a pool; default_limit is the limit of every pool that has no limit of its
            # own (only ``gpu`` exists here), and apply_pool_limit() makes ``gpu`` follow it.
            "pools": {"granularity": "op", "default_limit": settings.gpu_slots},
        },
        # Retry runs whose worker died (killed pod, OOM, restarted node); a failing asset is a bug or bad input
        # that a rerun would only repeat. Resumed training picks up from its last checkpoint.
        "run_retries": {
            "enabled": settings.run_retries > 0,
            "max_retries": settings.run_retries,
            "retry_on_asset_or_op_failure": False,
        },
        # Notices run workers that died without reporting (needs a launcher that can check them, e.g. k8s).
        "run_monitoring": {"enabled": True},
    }
    if settings.postgres_url:
        config["storage"] = {"postgres": {"postgres_url": {"env": POSTGRES_URL_VAR}}}
    return config


def render_instance_yaml(settings: InstanceSettings) -> str:
    header = "# Written by assets/instance.py from CASTLORA_* settings; edits are overwritten.\n"
    return header + yaml.safe_dump(render_instance_config(settings), sort_keys=False)


_locks_held = threading.local()


@contextmanager
def instance_lock(dagster_home: Path | str) -> Iterator[None]:
    """Hold an exclusive file lock (``fcntl.flock``) on ``$DAGSTER_HOME/.castlora-instance.lock``.

    The first process to open a fresh sqlite instance creates its tables; two doing it at once (two
    ``castlora register`` calls, or one beside ``make ui``) race and one fails half-way. Re-entrant within a
    thread, so a caller can hold it across ``ensure_instance`` and what must follow it (registering a pair).
    """
    home = Path(dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    key = str(home.resolve())
    held: set[str] = getattr(_locks_held, "homes", None) or set()
    _locks_held.homes = held
    if key in held:
        yield
        return
    with open(home / LOCK_FILENAME, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the OS if this process dies
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_instance(dagster_home: Path | str, settings: InstanceSettings | None = None) -> Path:
    """Write ``dagster.yaml`` when missing or different, and give the ``gpu`` pool its limit; return the file.

    Runs under ``instance_lock``: opening the instance here is what creates its storage on a fresh home."""
    settings = InstanceSettings.from_env() if settings is None else settings
    home = Path(dagster_home)
    with instance_lock(home):
        path = home / CONFIG_FILENAME
        text = render_instance_yaml(settings)
        if not path.is_file() or path.read_text() != text:
            # Atomic replace: a dagster process starting now reads the old file or the new one, never half of one.
            write_text_atomic(text, path)
        apply_pool_limit(home, settings)
    return path


def open_instance(dagster_home: Path | str, settings: InstanceSettings):
    """A DagsterInstance for the home, with the Postgres URL passed directly (the file only names the env var)."""
    from dagster._core.instance import DagsterInstance, InstanceRef

    overrides = {"storage": {"postgres": {"postgres_url": settings.postgres_url}}} if settings.postgres_url else None
    try:
        return DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home), overrides=overrides))
    except Exception as exc:
        where = f"Postgres ({POSTGRES_URL_VAR})" if settings.postgres_url else str(Path(dagster_home) / CONFIG_FILENAME)
        # dagster-postgres wraps the driver's error ("too many retries"); the cause says what is wrong.
        reason = f"{exc} ({exc.__cause__})" if exc.__cause__ else str(exc)
        raise CastloraError(f"Could not open the Dagster instance on {where}: {_redact(reason, settings)}") from None


def _redact(message: str, settings: InstanceSettings) -> str:
    """The message without the Postgres URL or its password (driver errors may quote either)."""
    if not settings.postgres_url:
        return message
    from sqlalchemy.engine import make_url

    message = message.replace(settings.postgres_url, f"${POSTGRES_URL_VAR}")
    password = make_url(settings.postgres_url).password
    return message.replace(password, "***") if password else message


def apply_pool_limit(dagster_home: Path | str, settings: InstanceSettings) -> None:
    """Make the ``gpu`` pool follow ``concurrency.pools.default_limit``, so the config file stays the one source.

    A pool that follows the default is re-synced by Dagster itself whenever the config's limit changes, even
    where nothing calls this (a daemon in a cluster); one set by hand in the UI or CLI would not be.
    """
    with open_instance(dagster_home, settings) as instance:
        storage = instance.event_log_storage
        if not storage.supports_global_concurrency_limits:
            raise CastloraError(
                f"The Dagster instance at {dagster_home} cannot limit pools; run `dagster instance migrate`."
            )
        current = storage.get_concurrency_info(GPU_POOL)
        if current.using_default_limit and current.slot_count == settings.gpu_slots:
            return
        # Delete first: a hand-set limit would shadow the config's, and on Postgres Dagster's update of an
        # existing row runs in a transaction its failed insert has already aborted (dagster 1.13.27).
        storage.delete_concurrency_limit(GPU_POOL)
        storage.initialize_concurrency_limit_to_default(GPU_POOL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m assets.instance DAGSTER_HOME", file=sys.stderr)
        return 2
    try:
        path = ensure_instance(args[0])
    except CastloraError as exc:
        print(f"castlora: {exc}", file=sys.stderr)
        return 2
    print(f"Dagster instance config: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
