"""Applies write plans to MLflow through ``MlflowClient``.

The writer keeps two promises:

* **Idempotent apply.** A run is found by the producer's run key, kept on the MLflow run as
  the tag ``kafka_mlflow_sink.run_key``; only a run key with no run yet creates one. What the
  run already holds (params, tags, metric points, end) is read once and skipped by the plan,
  so writing a record again writes nothing new.
* **Every failure classified.** MLflow errors become ``TransientWriteError`` (retry the
  batch later, commit nothing) or ``PermanentWriteError`` (the records involved go to the
  dead-letter topic). When a ``log_batch`` call is refused for good, its records are tried one
  by one so that only the records MLflow refuses are rejected.

The writer does not retry: the sink loop retries a whole batch, and idempotent apply makes
that safe even after a ``log_batch`` that was written in part.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from textwrap import shorten
from typing import Any, TypeVar

from cachetools import LRUCache
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request, verify_rest_response

from kafka_mlflow_sink.config import redact_uri
from kafka_mlflow_sink.errors import (
    Abandoned,
    ConfigError,
    PermanentWriteError,
    SinkError,
    TransientWriteError,
    WriteError,
    concise,
    first_line,
)
from kafka_mlflow_sink.events import MetricPoint, RunStarted
from kafka_mlflow_sink.plan import (
    CREATED_AT_TAG,
    PARENT_KEY_TAG,
    PARENT_RUN_TAG,
    RUN_KEY_TAG,
    RUN_NAME_TAG,
    START_UNKNOWN_TAG,
    LogBatch,
    Position,
    Rejection,
    RunEvents,
    RunState,
    plan_run,
    point_id,
)
from kafka_mlflow_sink.throttle import (
    THROTTLING_STATUSES,
    ThrottledResponse,
    answer_detail,
    parse_retry_after,
)

logger = logging.getLogger(__name__)

# Words of errors that mean "MLflow is away, busy or locked": retry, never give up on them.
_WAITING_MARKERS = (
    "database is locked",
    "connection refused",
    "newconnectionerror",
    "connection aborted",
    "connection reset",
    "remotedisconnected",
    "timed out",
    "timeout",
    "temporarily",
    "temporarily_unavailable",
    "request_limit_exceeded",
    "429",
    "502",
    "503",
    "504",
    "name or service not known",
    "name resolution",
)

T = TypeVar("T")

_LOG_BATCH_ENDPOINT = "/api/2.0/mlflow/runs/log-batch"

# MLflow error codes that describe the request, not the moment: retrying cannot help.
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_STATE",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
    }
)


@dataclass
class WriteReport:
    """What one ``apply`` did."""

    runs_created: int = 0
    runs_found: int = 0
    points: int = 0
    params: int = 0
    tags: int = 0
    artifacts: int = 0
    rejected: list[Rejection] = field(default_factory=list)


@dataclass
class _KnownRun:
    run_id: str
    state: RunState


def _json_double(value: float) -> float | str:
    """A double as the protobuf JSON mapping writes it: NaN and infinities as strings."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def log_batch_body(
    run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]
) -> dict[str, Any]:
    """The JSON body of a ``log-batch`` request, as MLflow's REST store would send it.

    Built straight from the entities: going through protobuf messages and their JSON
    printer, as MLflow does, costs about ten times the CPU for the same bytes, and the sink
    sends a thousand points a call. A test holds it equal to MLflow's own encoding.
    """
    body: dict[str, Any] = {"run_id": run_id}
    if metrics:
        body["metrics"] = [
            {"key": m.key, "value": _json_double(m.value), "timestamp": m.timestamp, "step": m.step}
            for m in metrics
        ]
    if params:
        body["params"] = [{"key": p.key, "value": p.value} for p in params]
    if tags:
        body["tags"] = [{"key": t.key, "value": t.value} for t in tags]
    return body


def _store_log_batch(client: MlflowClient) -> Callable[..., Any]:
    """``log_batch`` on the tracking store behind ``client``, for stores other than a server.

    ``MlflowClient.log_batch`` rebuilds every metric to attach the fluent API's active model
    and records a usage event, then hands the same lists to the store: a tenth of the time
    of a 1000-point call into SQLite, for features the sink does not use. The sink's batches
    already keep within the store's limits. Falls back to the client where an MLflow
    version keeps its store elsewhere.
    """
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    log_batch: Callable[..., Any] | None = getattr(store, "log_batch", None)
    if not callable(log_batch):
        return functools.partial(client.log_batch, synchronous=True)
    return log_batch


def _most_telling(errors: list[BaseException]) -> BaseException:
    """Of the failures of threads writing one batch, the one the retry loop must see.

    A thread stopped because another failed says nothing; of real failures, the one whose
    server asked for the longest pause wins, so the next attempt honours every Retry-After
    answered at once, not just the first thread's.
    """
    real = [e for e in errors if not isinstance(e, Abandoned)] or errors
    return max(real, key=lambda e: getattr(e, "retry_after", None) or 0.0)


def classify(exc: BaseException, action: str, run_key: str | None = None) -> WriteError:
    """The ``WriteError`` an exception raised by ``MlflowClient`` stands for.

    A throttling answer (``ThrottledResponse``) is MLflow asking the sink to slow down: it is
    retried after at least the pause MLflow asked for.
    """
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, ThrottledResponse):
        error = TransientWriteError(f"{action}: {exc}", run_key)
        error.retry_after = exc.throttled.retry_after
        return error
    text = concise(redact_uri(" ".join(str(exc).split())))[:300]
    code = getattr(exc, "error_code", None)
    said = text or type(exc).__name__
    # MLflow tags a request that never got an answer INTERNAL_ERROR; naming that code would
    # suggest a server fault where the server was not even reached.
    unanswered = said.startswith("API request to")
    reason = (
        f"{action}: {code}: {said}"
        if code and not said.startswith(code) and not unanswered
        else f"{action}: {said}"
    )
    lowered = text.lower()
    if (
        isinstance(exc, MlflowException)
        and code in _PERMANENT_CODES
        and "database is locked" not in lowered
    ):
        return PermanentWriteError(reason, run_key)
    transient = TransientWriteError(reason, run_key)
    # MLflow answered with an error of its own (a 500, say) rather than being away or busy:
    # that may be a bug triggered by this very request, which no retry will cure.
    transient.ambiguous = not any(marker in lowered for marker in _WAITING_MARKERS)
    return transient


class MlflowWriter:
    """Writes the runs of a batch into one MLflow tracking server or store.

    Args:
        tracking_uri: where MLflow is; MLflow's own default when None.
        max_cached_runs: runs whose identity and state are kept in memory.
        parallelism: runs written at once, each by its own thread. Worth it through a
            tracking server, which serves requests in parallel; an embedded store gains
            nothing. Each run's events are still written in offset order by one thread.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        max_cached_runs: int = 10_000,
        parallelism: int = 1,
    ) -> None:
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
        except Exception as exc:
            uri = redact_uri(tracking_uri or "(MLflow's default)")
            reason = first_line(exc) or type(exc).__name__
            raise ConfigError(f"tracking URI {uri} is not usable: {reason[:400]}") from exc
        self._experiments: dict[str, str] = {}
        self._runs = _RunCache(max_cached_runs)
        # Run keys whose "create run" failed in a way that may still succeed on the server
        # (a timeout): until when to look for that run instead of creating another.
        self._uncertain_creations: dict[str, float] = {}
        self._local = threading.local()  # the ``between`` of the thread writing a run
        self._experiment_lock = threading.Lock()
        self.parallelism = max(1, parallelism)
        self._pool: ThreadPoolExecutor | None = None
        scheme = urllib.parse.urlparse(self.client.tracking_uri).scheme
        self._log_batch_call: Callable[..., Any] = (
            self._rest_log_batch if scheme in ("http", "https") else _store_log_batch(self.client)
        )
        # Set by the retry loop once an error has persisted: an error MLflow itself returns
        # (not an outage) then counts as a refusal of the record, if MLflow answers otherwise.
        self.escalate_ambiguous = False

    def _call(
        self, action: str, run_key: str | None, fn: Callable[..., T], *args: Any, **kw: Any
    ) -> T:
        try:
            return fn(*args, **kw)
        except Exception as exc:
            error = classify(exc, action, run_key)
            if (
                isinstance(error, TransientWriteError)
                and error.ambiguous
                and self.escalate_ambiguous
                and self._mlflow_answers()
            ):
                raise PermanentWriteError(
                    f"{error.reason} (persisting while MLflow answers other requests)", run_key
                ) from exc
            raise error from exc

    def _mlflow_answers(self) -> bool:
        try:
            self.client.search_experiments(max_results=1)
        except Exception:
            return False
        return True

    def apply(
        self, runs: Iterable[RunEvents], between: Callable[[], None] | None = None
    ) -> WriteReport:
        """Write every run of a batch, in the order given.

        Args:
            runs: the batch, folded by run.
            between: called between MLflow calls; it may raise to abandon the batch (a stop
                request, revoked partitions), which leaves nothing half-believed behind.

        Returns:
            What was written and which records MLflow refuses for good.

        Raises:
            TransientWriteError: MLflow failed in a way that may pass; nothing may be committed
                and the whole batch is to be applied again.
        """
        runs = list(runs)
        between = between or (lambda: None)
        if self.parallelism == 1 or len(runs) < 2:
            self._local.between = between
            report = WriteReport()
            self._apply_in_order(runs, report)
            return report
        return self._apply_in_parallel(runs, between)

    def forget_runs(self) -> None:
        """Read every run from MLflow again before writing to it.

        What the cache holds is true only while no one else writes the run. After a
        rebalance another member may have written a run meanwhile (older values of its tags,
        say), and a stale cache would skip writes that are still needed.
        """
        self._runs.clear()

    def close(self) -> None:
        """Let the writing threads go; the writer is not used after this."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _check_between(self) -> None:
        check: Callable[[], None] | None = getattr(self._local, "between", None)
        if check is not None:
            check()

    def _apply_in_order(self, runs: Iterable[RunEvents], report: WriteReport) -> None:
        for run in runs:
            try:
                self._apply_run(run, report)
            except PermanentWriteError as exc:
                logger.debug("run %s refused for good: %s", run.run_key, exc.reason)
                rejected = {r.position for r in report.rejected}
                report.rejected.extend(
                    Rejection(s.position, exc.reason)
                    for s in run.events
                    if s.position not in rejected
                )
            except BaseException:
                # Partly applied: forget what we believed the run holds, read it again later.
                self._runs.pop(run.run_key)
                raise

    def _apply_in_parallel(self, runs: list[RunEvents], between: Callable[[], None]) -> WriteReport:
        """Write independent runs at once; the calling thread keeps calling ``between``.

        Invariant: the batch counts as written only when every run of it was; a failure or
        ``between`` raising stops the other threads at their next call and is raised here
        after all of them have stopped, so nothing of the batch is written behind the back
        of the retry or the rewind that follows.
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.parallelism, thread_name_prefix="mlflow-writer")
        stop = threading.Event()

        def check() -> None:
            if stop.is_set():
                raise Abandoned("another part of the batch failed")

        def write(group: list[RunEvents]) -> WriteReport:
            self._local.between = check
            part = WriteReport()
            try:
                self._apply_in_order(group, part)
            finally:
                self._local.between = None
            return part

        futures = [self._pool.submit(write, group) for group in _families(runs)]
        try:
            while True:
                done, pending = wait(futures, timeout=0.5, return_when=FIRST_EXCEPTION)
                if not pending or any(f.exception() is not None for f in done):
                    break
                between()
        finally:
            failed = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if failed or any(not f.done() for f in futures):
                stop.set()
                wait(futures)
        errors = [e for f in futures if (e := f.exception()) is not None]
        if errors:
            raise _most_telling(errors)
        report = WriteReport()
        for future in futures:
            part = future.result()
            for name in ("runs_created", "runs_found", "points", "params", "tags", "artifacts"):
                setattr(report, name, getattr(report, name) + getattr(part, name))
            report.rejected.extend(part.rejected)
        return report

    # -- one run ------------------------------------------------------------------------

    def _apply_run(self, run: RunEvents, report: WriteReport) -> None:
        known = self._resolve(run, report)
        writes = plan_run(run, known.state)
        report.rejected.extend(writes.rejected)
        refused = len(report.rejected)
        for batch in writes.batches:
            self._check_between()
            self._log_batch(known.run_id, run.run_key, batch, report)
        for artifact, position in writes.artifacts:
            self._check_between()
            if self._refusable(
                report,
                position,
                self._log_artifact,
                known.run_id,
                run.run_key,
                artifact.path,
                artifact.content,
            ):
                report.artifacts += 1
        if writes.finish is not None and writes.finish_position is not None:
            self._refusable(
                report,
                writes.finish_position,
                self._call,
                "end run",
                run.run_key,
                self.client.set_terminated,
                known.run_id,
                writes.finish.status,
                writes.finish.end_time,
            )
        if len(report.rejected) > refused:
            # MLflow refused part of the plan: what it holds is no longer what was planned.
            self._runs.pop(run.run_key)
        elif writes.finish is not None:
            # A finished run rarely hears more; keeping every point id of every run ever
            # finished would grow memory with the history. A late event reads it again.
            self._runs.pop(run.run_key)
        else:
            known.state = writes.state

    @staticmethod
    def _refusable(
        report: WriteReport, position: Position, fn: Callable[..., Any], *args: Any
    ) -> bool:
        """One write for one record; a refusal rejects that record only. True if written."""
        try:
            fn(*args)
        except PermanentWriteError as exc:
            report.rejected.append(Rejection(position, exc.reason))
            return False
        return True

    def _log_batch(self, run_id: str, run_key: str, batch: LogBatch, report: WriteReport) -> None:
        try:
            self._send_batch(run_id, run_key, batch)
        except PermanentWriteError as exc:
            if len(batch.positions) == 1:
                report.rejected.append(Rejection(batch.positions[0], exc.reason))
                return
            # Find the records MLflow refuses: the others are written on their own.
            for position in batch.positions:
                self._log_batch(run_id, run_key, batch.only(position), report)
            return
        report.points += len(batch.metrics)
        report.params += len(batch.params)
        report.tags += len(batch.tags)

    def _send_batch(self, run_id: str, run_key: str, batch: LogBatch) -> None:
        self._call(
            "log_batch",
            run_key,
            self._log_batch_call,
            run_id,
            metrics=[Metric(p.key, p.value, p.timestamp, p.step) for p in batch.metrics],
            params=[Param(k, v) for k, v in batch.params],
            tags=[RunTag(k, v) for k, v in batch.tags],
        )

    def _rest_log_batch(
        self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]
    ) -> None:
        """``log-batch`` through a tracking server's REST API, reading throttling answers.

        The request is the one MLflow's own REST store sends. No status counts as retryable
        for MLflow's HTTP layer, so a 429 or 503 comes back as a response whose Retry-After
        is read here (see ``throttle``); any other error is raised as MLflow raises it.
        """
        response = http_request(  # type: ignore[no-untyped-call]
            get_default_host_creds(self.client.tracking_uri),  # type: ignore[no-untyped-call]
            _LOG_BATCH_ENDPOINT,
            "POST",
            json=log_batch_body(run_id, metrics, params, tags),
            max_retries=0,
            retry_codes=frozenset(),
        )
        if response.status_code in THROTTLING_STATUSES:
            try:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            except Exception:  # whatever the header holds, the answer still says "wait"
                retry_after = None
            raise ThrottledResponse(response.status_code, retry_after, answer_detail(response.text))
        verify_rest_response(response, _LOG_BATCH_ENDPOINT)

    def _log_artifact(self, run_id: str, run_key: str, path: str, content: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="kafka-mlflow-sink-") as tmp:
            local = Path(tmp, path)
            try:
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(content)
            except OSError as exc:
                raise PermanentWriteError(
                    f"artifact {path!r} cannot be stored as a file: {exc.strerror}", run_key
                ) from exc
            folder = str(Path(path).parent)
            self._call(
                f"log artifact {path!r}",
                run_key,
                self.client.log_artifact,
                run_id,
                str(local),
                None if folder == "." else folder,
            )

    # -- run identity -------------------------------------------------------------------

    def _resolve(self, run: RunEvents, report: WriteReport) -> _KnownRun:
        """The MLflow run for ``run``'s key: cached, found by its tag, or created."""
        known = self._runs.get(run.run_key)
        if known is None:
            experiment_id = self._experiment_id(run.experiment_name, run.run_key)
            known = self._find(experiment_id, run.run_key)
            if known is not None:
                self._uncertain_creations.pop(run.run_key, None)
                report.runs_found += 1
            else:
                known = self._create(experiment_id, run)
                report.runs_created += 1
            self._runs.put(run.run_key, known)
        self._complete_start(known, run)
        return known

    def _experiment_id(self, name: str, run_key: str) -> str:
        cached = self._experiments.get(name)
        if cached is not None:
            return cached
        # One writer thread looks the experiment up (or creates it); the others wait for it.
        with self._experiment_lock:
            cached = self._experiments.get(name)
            if cached is not None:
                return cached
            return self._resolve_experiment(name, run_key)

    def _resolve_experiment(self, name: str, run_key: str) -> str:
        experiment = self._call("get experiment", run_key, self.client.get_experiment_by_name, name)
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise PermanentWriteError(f"experiment {name!r} is deleted in MLflow", run_key)
        if experiment is not None:
            experiment_id = str(experiment.experiment_id)
        else:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException as exc:
                # Another sink instance may have created it a moment ago.
                found = self._call(
                    "get experiment", run_key, self.client.get_experiment_by_name, name
                )
                if found is None:
                    raise classify(exc, f"create experiment {name!r}", run_key) from exc
                experiment_id = str(found.experiment_id)
            except Exception as exc:
                raise classify(exc, f"create experiment {name!r}", run_key) from exc
            logger.info("created MLflow experiment %r (id %s)", name, experiment_id)
        self._experiments[name] = experiment_id
        return experiment_id

    def _find(self, experiment_id: str, run_key: str) -> _KnownRun | None:
        runs = self._search(experiment_id, run_key)
        active = _active(runs)
        if runs and not active:
            raise PermanentWriteError(f"run {run_key} is deleted in MLflow", run_key)
        if not active:
            return None
        if len(active) > 1:
            logger.warning(
                "run key %s has %d MLflow runs; writing to the first created", run_key, len(active)
            )
        first = min(active, key=creation_order)
        return _KnownRun(first.info.run_id, self._read_state(first, run_key))

    def _search(self, experiment_id: str, run_key: str) -> list[Any]:
        return list(
            self._call(
                "search runs",
                run_key,
                self.client.search_runs,
                [experiment_id],
                filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                run_view_type=ViewType.ALL,
                max_results=10,
            )
        )

    def _read_state(self, mlflow_run: Any, run_key: str) -> RunState:
        """What an existing MLflow run holds, every metric point included."""
        run_id = mlflow_run.info.run_id
        state = RunState(
            params=dict(mlflow_run.data.params),
            tags=dict(mlflow_run.data.tags),
            status=mlflow_run.info.status,
            end_time=mlflow_run.info.end_time,
        )
        for key in mlflow_run.data.metrics:
            history = self._call(
                "read metric history", run_key, self.client.get_metric_history, run_id, key
            )
            state.points.update(
                point_id(MetricPoint(m.key, m.value, m.step, m.timestamp)) for m in history
            )
        return state

    def _create(self, experiment_id: str, run: RunEvents) -> _KnownRun:
        start = run.start
        tags = dict(start.tags) if start else {}
        tags[RUN_KEY_TAG] = run.run_key  # after the event's tags: nothing may replace it
        parent_key = start.parent_run_key if start else None
        if start is None:
            # Its "run started" event is gone (retention) or still to come: say so.
            tags[START_UNKNOWN_TAG] = "true"
        if parent_key:
            tags[PARENT_KEY_TAG] = parent_key
            parent_id = self._parent_run_id(experiment_id, parent_key)
            if parent_id is not None:
                tags[PARENT_RUN_TAG] = parent_id
        pending = self._uncertain_creations.get(run.run_key)
        if pending is not None and time.monotonic() < pending:
            raise TransientWriteError(
                f"create run: an earlier attempt for run key {run.run_key} timed out and may "
                "still land in MLflow; looking for it again before creating another",
                run.run_key,
            )
        # Stamped as late as possible: the order of the stamps must be the order in which
        # the runs appear in MLflow, or two writers could each keep their own run.
        tags[CREATED_AT_TAG] = str(int(time.time() * 1000))
        try:
            created = self._call(
                "create run",
                run.run_key,
                self.client.create_run,
                experiment_id,
                start_time=start.start_time if start else run.first_created_at,
                tags=tags,
                run_name=run_name(run.run_key, start),
            )
        except TransientWriteError as exc:
            if _may_have_landed(exc.reason):
                # The server may still create it after the client gave up: creating again
                # now would leave two MLflow runs for one run key.
                self._uncertain_creations[run.run_key] = time.monotonic() + _settle_seconds()
            raise
        self._uncertain_creations.pop(run.run_key, None)
        run_id = created.info.run_id
        state = RunState(tags=dict(created.data.tags), status=created.info.status)
        winner = self._settle_creation(experiment_id, run.run_key, run_id)
        if winner is not None:
            return winner
        logger.info(
            "created MLflow run %s (%s) for run key %s",
            run_id,
            shorten(run_name(run.run_key, start), 80, placeholder=" ..."),
            run.run_key,
        )
        self._adopt_children(experiment_id, run.run_key, run_id)
        if parent_key and PARENT_RUN_TAG not in tags:
            # The parent may have been created meanwhile, by another instance.
            self._link_to_parent(experiment_id, parent_key, run_id, state)
        return _KnownRun(run_id, state)

    def _parent_run_id(self, experiment_id: str, parent_key: str) -> str | None:
        """The parent's MLflow run id, or None while its "run started" has not been written.

        No stand-in parent is created: it would keep a made-up start time for good, as MLflow
        cannot change a run's start time. The child waits with its parent's run key instead.
        """
        known = self._runs.get(parent_key)
        if known is not None:
            return known.run_id
        try:
            found = self._find(experiment_id, parent_key)
        except PermanentWriteError:  # the parent was deleted in MLflow
            return None
        if found is not None:
            self._runs.put(parent_key, found)
        return found.run_id if found else None

    def _link_to_parent(
        self, experiment_id: str, parent_key: str, run_id: str, state: RunState
    ) -> None:
        parent_id = self._parent_run_id(experiment_id, parent_key)
        if parent_id is not None:
            self._call(
                "link parent run",
                parent_key,
                self.client.set_tag,
                run_id,
                PARENT_RUN_TAG,
                parent_id,
            )
            state.tags[PARENT_RUN_TAG] = parent_id

    def _adopt_children(self, experiment_id: str, run_key: str, run_id: str) -> None:
        """Point the runs waiting for this run as their parent at it."""
        waiting = self._call(
            "search child runs",
            run_key,
            self.client.search_runs,
            [experiment_id],
            filter_string=f"tags.`{PARENT_KEY_TAG}` = '{run_key}'",
            max_results=1000,
        )
        for child in waiting:
            if PARENT_RUN_TAG in child.data.tags:
                continue
            self._call(
                "link child run",
                run_key,
                self.client.set_tag,
                child.info.run_id,
                PARENT_RUN_TAG,
                run_id,
            )
            cached = self._runs.get(child.data.tags.get(RUN_KEY_TAG, ""))
            if cached is not None:
                cached.state.tags[PARENT_RUN_TAG] = run_id

    def _settle_creation(self, experiment_id: str, run_key: str, mine: str) -> _KnownRun | None:
        """After creating a run, make sure it is the only one for its key.

        Another writer (a replay next to the daemon, say) may have created one at the same
        moment: MLflow has no unique key to prevent it. Every writer keeps the run created
        first and deletes its own if it is not that one, so all of them end up on one run.

        Returns:
            The run to use instead of ``mine``, or None to keep ``mine``.
        """
        active = _active(self._search(experiment_id, run_key))
        if len(active) < 2:
            return None
        first = min(active, key=creation_order)
        if first.info.run_id == mine:
            return None
        self._call("delete duplicate run", run_key, self.client.delete_run, mine)
        logger.warning(
            "run key %s was created twice at once; kept MLflow run %s, deleted %s",
            run_key,
            first.info.run_id,
            mine,
        )
        return _KnownRun(first.info.run_id, self._read_state(first, run_key))

    def _complete_start(self, known: _KnownRun, run: RunEvents) -> None:
        """Give a run created before its "run started" arrived the name and marks it lacked."""
        start = run.start
        if start is None or START_UNKNOWN_TAG not in known.state.tags:
            return
        name = run_name(run.run_key, start)
        if known.state.tags.get(RUN_NAME_TAG) != name:
            self._call("rename run", run.run_key, self.client.update_run, known.run_id, name=name)
            known.state.tags[RUN_NAME_TAG] = name
        self._call(
            "clear start mark", run.run_key, self.client.delete_tag, known.run_id, START_UNKNOWN_TAG
        )
        del known.state.tags[START_UNKNOWN_TAG]


def _active(runs: list[Any]) -> list[Any]:
    return [r for r in runs if r.info.lifecycle_stage != "deleted"]


def creation_order(run: Any) -> tuple[int, str]:
    """Orders the runs of one key the same way for every writer: created first, then by id.

    The start time cannot tell: every writer creates the run with the start time of its
    "run started" event. A writer that checked before the other's run existed keeps its own,
    so the one that checks later must see its own run as the later one: the creation time
    the sink tagged the run with says so (runs created without it count by start time).
    """
    created = run.data.tags.get(CREATED_AT_TAG, "")
    when = int(created) if created.isdigit() else run.info.start_time or 0
    return (when, run.info.run_id)


def run_name(run_key: str, start: RunStarted | None) -> str:
    """The MLflow run name: the producer's (given, or as the ``mlflow.runName`` tag), else the
    run key.

    MLflow would pick a random name; the run key keeps a rebuilt history identical. A name
    other than the tag's would make MLflow refuse to create the run.
    """
    if start is None:
        return run_key
    return start.run_name or start.tags.get(RUN_NAME_TAG) or run_key


class MlflowUnavailable(SinkError):
    """MLflow cannot be reached at start-up."""


def check_mlflow(writer: MlflowWriter) -> None:
    """Fail with one line when MLflow does not answer at start-up."""
    try:
        writer.client.search_experiments(max_results=1)
    except Exception as exc:
        reason = classify(exc, "search experiments").reason
        uri = redact_uri(writer.client.tracking_uri)
        raise MlflowUnavailable(f"cannot reach MLflow at {uri}: {reason}") from exc


def _may_have_landed(reason: str) -> bool:
    """Whether a failed request may have reached MLflow and be carried out after all."""
    lowered = reason.lower()
    unsent = ("connection refused", "newconnectionerror", "failed to establish", "name or service")
    refused = ("429", "503", "throttles", "is busy")
    return not any(word in lowered for word in unsent + refused)


def _settle_seconds() -> float:
    """How long a timed-out request may still be carried out: twice the HTTP timeout."""
    try:
        timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))
    except ValueError:
        timeout = 120.0
    return 2 * timeout + 5


class _RunCache:
    """Known runs by run key, least recently used dropped first; safe across threads."""

    def __init__(self, size: int) -> None:
        self._runs: LRUCache[str, _KnownRun] = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    def get(self, run_key: str) -> _KnownRun | None:
        with self._lock:
            return self._runs.get(run_key)

    def put(self, run_key: str, known: _KnownRun) -> None:
        with self._lock:
            self._runs[run_key] = known

    def pop(self, run_key: str) -> None:
        with self._lock:
            self._runs.pop(run_key, None)

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)


def _families(runs: list[RunEvents]) -> list[list[RunEvents]]:
    """The runs of a batch in groups that can be written at once: a run whose parent is in the
    batch too goes with it, after it, so the parent's MLflow run exists when the child needs
    it. Order inside each group is the batch's order."""
    family: dict[str, int] = {}
    groups: list[list[RunEvents]] = []
    for run in runs:  # parents come before their children (group_by_run)
        start = run.start
        parent = start.parent_run_key if start else None
        if parent is not None and parent in family:
            index = family[parent]
        else:
            index = len(groups)
            groups.append([])
        family[run.run_key] = index
        groups[index].append(run)
    return groups
