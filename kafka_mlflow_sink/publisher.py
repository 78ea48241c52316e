"""The training-job side: publish run events to Kafka with an API shaped like MLflow's.

The Publisher is a library, safe in a script or a notebook: it installs no signal handlers,
configures no logging and does no I/O at import. Events of one run share the run key as their
Kafka key, so they land on one partition and the sink applies them in order.

Example::

    from kafka_mlflow_sink import Publisher

    with Publisher("127.0.0.1:9092", topic="mlflow-events", experiment_name="digits") as pub:
        with pub.start_run(run_name="sgd-baseline"):
            pub.log_params({"alpha": 1e-4, "epochs": 10})
            for epoch in range(10):
                pub.log_metrics({"loss": 0.5 / (epoch + 1)}, step=epoch)
            pub.log_text("hello", "notes/readme.txt")

Leaving ``start_run``'s block ends the run as FINISHED, or as FAILED when the block raised.
Leaving the Publisher's block (or calling ``close``) waits until Kafka acknowledged every event
and raises ``PublishError`` if any was not delivered.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from kafka_mlflow_sink.codec import Codec, make_codec
from kafka_mlflow_sink.errors import PublishError
from kafka_mlflow_sink.events import (
    RUN_KEY_PATTERN,
    ArtifactLogged,
    MetricPoint,
    MetricsLogged,
    ParamsLogged,
    Payload,
    RunEvent,
    RunFinished,
    RunStarted,
    TagsSet,
    now_ms,
)
from kafka_mlflow_sink.kafkalog import LIBRDKAFKA_LOGGER
from kafka_mlflow_sink.plan import (
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    RESERVED_TAG_PREFIX,
    check_artifact_path,
    check_key,
    check_run_name,
    check_tag,
)

# Inline artifacts travel inside one Kafka record; the broker's default limit is 1 MiB.
MAX_ARTIFACT_BYTES = 512 * 1024
# How the Publisher produces unless ``producer_config`` says otherwise: no event lost or
# doubled by a producer retry, and events gathered for 20 ms into compressed batches, so a
# training loop logging every step costs the broker a request per batch, not per event.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "compression.type": "lz4",
}


class PublishedRun:
    """A run the Publisher is publishing events for; ``start_run`` yields it.

    Attributes:
        run_key: the run's identity: the Kafka key of its events, and the tag
            ``kafka_mlflow_sink.run_key`` on its MLflow run (not the MLflow run id).
        run_name: the name given to ``start_run``, if any.
        parent_run_key: the enclosing run's key for a nested run, else None.
    """

    run_key: str
    run_name: str | None
    parent_run_key: str | None

    def __init__(self, run_key: str, run_name: str | None, parent_run_key: str | None) -> None:
        self.run_key = run_key
        self.run_name = run_name
        self.parent_run_key = parent_run_key

    def __repr__(self) -> str:
        parent = f", parent_run_key={self.parent_run_key!r}" if self.parent_run_key else ""
        return f"PublishedRun(run_key={self.run_key!r}, run_name={self.run_name!r}{parent})"


class Publisher:
    """Publishes the events of training runs to a Kafka topic.

    Args:
        bootstrap_servers: Kafka brokers, ``host:port[,host:port]``.
        topic: the topic the sink consumes.
        experiment_name: MLflow experiment for the runs started through this Publisher.
        framing: ``bare`` (bundled schema) or ``registry`` (Confluent wire format).
        schema_registry_url: needed with ``framing="registry"``.
        producer_config: extra librdkafka settings, e.g. security settings.
        flush_timeout: seconds ``flush`` waits for acknowledgements before it gives up.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        experiment_name: str = "Default",
        *,
        framing: str = "bare",
        schema_registry_url: str | None = None,
        producer_config: Mapping[str, Any] | None = None,
        flush_timeout: float = 30.0,
    ) -> None:
        self.topic = topic
        self.experiment_name = experiment_name
        self._codec: Codec = make_codec(framing, schema_registry_url)
        self._flush_timeout = flush_timeout
        config = {
            "bootstrap.servers": bootstrap_servers,
            **PRODUCER_DEFAULTS,
            # librdkafka's own log lines go to Python logging, where the application routes them.
            "logger": LIBRDKAFKA_LOGGER,
            **(producer_config or {}),
        }
        self._producer = Producer(config)
        self._failures: list[str] = []
        self._lock = threading.Lock()
        self._runs: list[PublishedRun] = []
        self._closed = False
        self.events_sent = 0

    # -- runs ---------------------------------------------------------------------------

    @contextmanager
    def start_run(
        self,
        run_name: str | None = None,
        *,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
        run_key: str | None = None,
        start_time: int | None = None,
    ) -> Iterator[PublishedRun]:
        """Start a run; leaving the block ends it as FINISHED, or FAILED on an exception.

        Args:
            run_name: MLflow run name.
            tags: tags set when the run starts.
            nested: start a child of the active run instead of refusing to.
            run_key: the run's identity; a fresh UUID when not given. Give one to resume.
            start_time: epoch milliseconds; now when not given.
        """
        run = self.begin_run(
            run_name, tags=tags, nested=nested, run_key=run_key, start_time=start_time
        )
        try:
            yield run
        except PublishError:
            # A flush inside has just waited flush_timeout and failed: end the run, but do
            # not wait as long again before the job hears of it.
            if self.active_run is run:
                self._end_unflushed("FAILED")
            raise
        except BaseException:
            if self.active_run is run:
                self.end_run("FAILED")
            raise
        if self.active_run is run:
            self.end_run("FINISHED")

    def begin_run(
        self,
        run_name: str | None = None,
        *,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
        run_key: str | None = None,
        start_time: int | None = None,
    ) -> PublishedRun:
        """Start a run without a ``with`` block; end it with ``end_run``."""
        if self._runs and not nested:
            raise ValueError(
                f"run {self._runs[-1].run_key} is active; end it first or pass nested=True"
            )
        if run_key is not None and not RUN_KEY_PATTERN.match(run_key):
            raise ValueError(f"run_key {run_key!r} must be 1-200 of [A-Za-z0-9_.:-]")
        parent = self._runs[-1].run_key if self._runs else None
        started = RunStarted(
            start_time=now_ms() if start_time is None else start_time,
            run_name=run_name,
            tags=_start_tags(run_name, tags or {}),
            parent_run_key=parent,
        )
        run = PublishedRun(run_key or uuid.uuid4().hex, run_name, parent)
        self._runs.append(run)
        self._send(started)
        return run

    def end_run(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        """End the active run with ``status`` (FINISHED, FAILED or KILLED) and flush."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        self._end_unflushed(status, end_time)
        self.flush()

    def _end_unflushed(self, status: str, end_time: int | None = None) -> None:
        self._send(RunFinished(status, now_ms() if end_time is None else end_time))
        self._runs.pop()

    @property
    def active_run(self) -> PublishedRun | None:
        """The innermost run started and not yet ended, if any."""
        return self._runs[-1] if self._runs else None

    # -- logging ------------------------------------------------------------------------

    def log_param(self, key: str, value: Any) -> None:
        """Log one param of the active run; the value is stored as ``str(value)``."""
        self.log_params({key: value})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params of the active run in one event."""
        if params:
            self._send(ParamsLogged(_strings(params, "param", MAX_PARAM_VALUE_LENGTH)))

    def log_metric(
        self, key: str, value: float, step: int = 0, timestamp: int | None = None
    ) -> None:
        """Log one metric point; ``timestamp`` is epoch milliseconds, now when not given."""
        self.log_metrics({key: value}, step=step, timestamp=timestamp)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int = 0, timestamp: int | None = None
    ) -> None:
        """Log several metrics at one step and time in one event."""
        ts = now_ms() if timestamp is None else timestamp
        points = tuple(MetricPoint(k, _float(k, v), int(step), ts) for k, v in metrics.items())
        for point in points:
            problem = check_key("metric", point.key)
            if problem is not None:
                raise ValueError(f"{problem}; MLflow would refuse it")
        if points:
            self._send(MetricsLogged(points))

    def set_tag(self, key: str, value: Any) -> None:
        """Set one tag on the active run."""
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the active run in one event."""
        if tags:
            self._send(TagsSet(_strings(tags, "tag", MAX_TAG_VALUE_LENGTH)))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Send a small file as an artifact of the active run.

        The file lands at ``<artifact_path>/<file name>`` in the run's artifacts. Files over
        ``MAX_ARTIFACT_BYTES`` are refused: large artifacts belong in object storage.
        """
        path = Path(local_path)
        content = path.read_bytes()
        target = f"{artifact_path.strip('/')}/{path.name}" if artifact_path else path.name
        self.log_bytes(content, target)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Send ``text`` as a UTF-8 artifact at ``artifact_file``."""
        self.log_bytes(text.encode("utf-8"), artifact_file)

    def log_bytes(self, content: bytes, artifact_file: str) -> None:
        """Send ``content`` as an artifact at ``artifact_file`` (a '/'-separated path)."""
        if len(content) > MAX_ARTIFACT_BYTES:
            raise ValueError(
                f"artifact {artifact_file!r} has {len(content)} bytes; inline artifacts are "
                f"limited to {MAX_ARTIFACT_BYTES}"
            )
        problem = check_artifact_path(artifact_file)
        if problem:
            raise ValueError(problem)
        self._send(ArtifactLogged(artifact_file, content))

    # -- delivery -----------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Wait until Kafka acknowledged every event sent so far.

        Raises:
            PublishError: when events were not delivered, or not within the timeout.
        """
        left = self._producer.flush(self._flush_timeout if timeout is None else timeout)
        with self._lock:
            failures, self._failures = self._failures, []
        if left:
            failures.append(f"{left} event(s) still unacknowledged after the flush timeout")
        if failures:
            raise PublishError(f"{len(failures)} delivery problem(s): " + "; ".join(failures[:5]))

    def close(self, timeout: float | None = None) -> None:
        """End any active runs as KILLED, flush, and release the producer. Idempotent.

        Args:
            timeout: seconds to wait for acknowledgements; ``flush_timeout`` when None.
        """
        if self._closed:
            return
        while self._runs:
            self.end_run("KILLED")
        self._closed = True
        self.flush(timeout)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, PublishError):
            # A flush has just waited flush_timeout and failed: its error is on its way to
            # the job. The runs still open are ended, but waiting as long again for their
            # acknowledgement would only delay that error.
            while self._runs:
                self._end_unflushed("FAILED")
            with contextlib.suppress(PublishError):
                self.close(timeout=0)
            return
        if exc_type is not None:
            while self._runs:
                self.end_run("FAILED")
        self.close()

    def _send(self, payload: Payload) -> None:
        if self._closed:
            raise PublishError("the Publisher is closed")
        run = self.active_run
        if run is None:
            raise ValueError("no active run: call start_run first")
        event = RunEvent(run.run_key, self.experiment_name, payload)
        value = self._codec.encode(event, self.topic)
        while True:
            try:
                self._producer.produce(
                    self.topic, value=value, key=run.run_key.encode(), on_delivery=self._delivered
                )
                break
            except BufferError:
                # The local queue is full: let librdkafka send some before trying again.
                self._producer.poll(0.5)
        self.events_sent += 1
        self._producer.poll(0)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            with self._lock:
                self._failures.append(f"{msg.topic()}: {err.str()}")


def _strings(values: Mapping[str, Any], kind: str = "", limit: int = 0) -> dict[str, str]:
    """``values`` as strings; with ``kind``, refused here when MLflow would refuse them."""
    strings = {str(k): str(v) for k, v in values.items()}
    if kind:
        for key, value in strings.items():
            problem = check_tag(key, value) if kind == "tag" else check_key(kind, key)
            if problem is None and len(value) > limit:
                problem = f"{kind} {key!r} has a value of {len(value)} characters, over {limit}"
            if problem is not None:
                who = "the sink" if key.startswith(RESERVED_TAG_PREFIX) else "MLflow"
                raise ValueError(f"{problem}; {who} would refuse it")
    return strings


def _start_tags(run_name: str | None, tags: Mapping[str, Any]) -> dict[str, str]:
    strings = _strings(tags, "tag", MAX_TAG_VALUE_LENGTH)
    problem = check_run_name(run_name, strings)
    if problem:
        raise ValueError(problem)
    return strings


def _float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metric {key!r} needs a number, got {value!r}") from exc
