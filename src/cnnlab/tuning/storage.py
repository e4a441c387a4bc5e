"""Optuna storages for a study: SQLite, a journal file with heartbeats, or a PostgreSQL server."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock
from optuna.trial import TrialState

from cnnlab.errors import ConfigError

log = logging.getLogger(__name__)

JOURNAL_SCHEME = "journal:"  # journal:/abs/path/journal.log (one host, several processes)
HEARTBEAT_ATTR = "cnnlab:heartbeat"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def journal_url(path: Path) -> str:
    return f"{JOURNAL_SCHEME}{path.resolve()}"


def kind_of(url: str) -> str:
    """'sqlite', 'journal' or the database dialect ('postgresql', 'mysql', ...)."""
    if url.startswith(JOURNAL_SCHEME):
        return "journal"
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    if not dialect or "://" not in url:
        raise ConfigError(
            f"--storage '{url}' is not a database URL. Use postgresql://USER:PASSWORD@HOST/DB "
            "(several machines), or leave it out for a study file in the study folder."
        )
    return dialect


def engine_url(url: str) -> str:
    """postgresql://... with the driver that is installed (psycopg 3, else psycopg2)."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def open_storage(url: str, heartbeat: float, max_retries: int) -> optuna.storages.BaseStorage:
    """A storage whose running trials beat every `heartbeat` s; dead ones fail and are retried.

    A trial silent for three intervals is failed by the next worker that looks, and re-queued
    with the same parameters (at most `max_retries` times) by Optuna's retry callback.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
        interval = max(1, round(heartbeat))
        if kind_of(url) == "journal":
            return HeartbeatJournalStorage(
                Path(url[len(JOURNAL_SCHEME) :]), interval, 3 * interval, retry
            )
        try:
            return RDBStorage(
                engine_url(url),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                heartbeat_interval=interval,
                grace_period=3 * interval,
                heartbeat_stale_trial_callback=retry,
            )
        except Exception as exc:  # sqlalchemy's OperationalError, ImportError, ArgumentError
            raise ConfigError(
                f"Cannot open the study storage {redact(url)}: {str(exc).splitlines()[0]}. "
                "Check the URL, that the server runs and accepts this user, and that its "
                "driver is installed (psycopg2-binary for PostgreSQL)."
            ) from exc


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for logs and messages."""
    head, sep, tail = url.partition("://")
    if not sep or "@" not in tail:
        return url
    credentials, _, host = tail.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{head}://{user}:***@{host}" if ":" in credentials else url


class FlockLock(BaseJournalFileLock):
    """An fcntl lock for the journal file: released by the kernel when its holder dies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.handle: Any = None

    def acquire(self) -> bool:
        handle = open(self.path, "a")  # noqa: SIM115 - held until release()
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        self.handle = handle
        return True

    def release(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal file storage plus the heartbeat that Optuna gives only RDB storages.

    Each running trial records a timestamp attribute every `interval` seconds; one older than
    `grace` seconds (or a trial that never beat since it started) marks a dead worker.
    """

    def __init__(self, path: Path, interval: int, grace: float, callback: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(JournalFileBackend(str(path), lock_obj=FlockLock(f"{path}.lock")))
        self._interval = interval
        self._grace = grace
        self._callback = callback

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            # A retried trial inherits its parent's old beat: the start time counts too.
            last = max(float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)), started)
            if now - last > self._grace:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> Any:
        return self._callback


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and re-queue) trials whose worker stopped beating; quiet about Optuna's warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextlib.contextmanager
def claim_lock(url: str, study_dir: Path, study_name: str) -> Iterator[Any]:
    """A lock shared by every worker of the study, held while a worker claims its next trial.

    Yields a `release()` function (idempotent) so the trial can let go once it is RUNNING.
    Journal and SQLite studies lock a file next to the storage; server databases take a
    PostgreSQL advisory lock (released by the server if the worker dies).
    """
    kind = kind_of(url)
    if kind == "postgresql":
        with _advisory_lock(url, study_name) as release:
            yield release
        return
    if kind in ("journal", "sqlite"):
        path = study_dir / ".claim.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # noqa: SIM115 - closed by release()
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)

        def release_file() -> None:
            if not handle.closed:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()

        try:
            yield release_file
        finally:
            release_file()
        return
    yield lambda: None  # other databases: claims may overshoot by a trial per worker


@contextlib.contextmanager
def _advisory_lock(url: str, study_name: str) -> Iterator[Any]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(engine_url(url), poolclass=sqlalchemy.pool.NullPool)
    connection = engine.connect()
    key = f"cnnlab-tune:{study_name}"
    connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(hashtext(:k))"), {"k": key})
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            connection.execute(
                sqlalchemy.text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key}
            )
            connection.close()
            engine.dispose()

    try:
        yield release
    finally:
        release()


def worker_id() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
