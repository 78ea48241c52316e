"""Helpers for tests that run the real sink daemon against a real broker and MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from mlflow import MlflowClient

from kafka_mlflow_sink.batch import position
from kafka_mlflow_sink.codec import BareCodec, Codec
from kafka_mlflow_sink.config import SinkConfig
from kafka_mlflow_sink.deadletter import HEADER_PREFIX
from kafka_mlflow_sink.errors import DecodeError
from kafka_mlflow_sink.events import (
    ArtifactLogged,
    MetricPoint,
    MetricsLogged,
    ParamsLogged,
    Payload,
    RunEvent,
    RunFinished,
    RunStarted,
    TagsSet,
)
from kafka_mlflow_sink.offsets import PartitionLag, group_lag
from kafka_mlflow_sink.plan import (
    CREATED_AT_TAG,
    RUN_KEY_TAG,
    SourcedEvent,
    group_by_run,
    point_id,
)
from kafka_mlflow_sink.verify import (
    RunContent,
    differences,
    expected_runs,
    read_mlflow,
    read_topic,
)

BIN = Path(sys.executable).parent
# Each reliability scenario leaves its tally here; the session summary prints them as a table.
TALLY_DIR = Path(__file__).resolve().parent.parent / "build" / "reliability"
SOAK_FIGURES = TALLY_DIR.parent / "soak.json"  # the soak's memory and lag figures


class SinkProcess:
    """``kafka-mlflow-sink run`` as a child process, logging to a file."""

    def __init__(self, log_file: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_file = log_file
        self.args = args
        with log_file.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [str(BIN / "kafka-mlflow-sink"), "run", "--batch-max-wait", "0.2", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", **(env or {})},
            )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def log_contains(self, text: str) -> Callable[[], bool]:
        """A condition for ``wait_until``: the log holds ``text``."""
        return lambda: text in self.log()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code; the daemon must stop by itself within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def sink_args(bootstrap: str, topic: str, group: str, tracking_uri: str) -> list[str]:
    return [
        "-b",
        bootstrap,
        "-t",
        topic,
        "-g",
        group,
        "--tracking-uri",
        tracking_uri,
        "--log-level",
        "DEBUG",
    ]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``kafka-mlflow-sink ARGS`` to completion."""
    return subprocess.run(
        [str(BIN / "kafka-mlflow-sink"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def lag(bootstrap: str, topic: str, group: str) -> list[PartitionLag]:
    return group_lag(SinkConfig(bootstrap, (topic,), group_id=group))


def wait_for_zero_lag(
    bootstrap: str, topic: str, group: str, sink: SinkProcess, timeout: float = 90
) -> list[PartitionLag]:
    def done() -> bool:
        if sink.process.poll() is not None:
            raise AssertionError(f"sink exited with {sink.process.returncode}:\n{sink.log()}")
        return sum(row.lag for row in lag(bootstrap, topic, group)) == 0

    wait_until(done, timeout, f"group {group} to commit all of {topic}")
    return lag(bootstrap, topic, group)


def consume_all(bootstrap: str, topic: str, timeout: float = 10) -> list[Message]:
    """Every record of ``topic``, read with manual assignment and no commits."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
        if meta.error is not None:  # no such topic: nothing in it
            return []
        ends = {}
        for p in meta.partitions:
            ends[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        records: list[Message] = []
        deadline = time.monotonic() + timeout
        while sum(ends.values()) > len(records) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                records.append(msg)
        return records
    finally:
        consumer.close()


def topic_runs(bootstrap: str, topic: str) -> dict[str, RunContent]:
    """What the topic says every run holds, folded the way the sink writes."""
    settings = {"bootstrap.servers": bootstrap, "group.id": f"verify-{uuid.uuid4()}"}
    return read_topic(settings, (topic,), BareCodec()).runs


def mlflow_runs(tracking_uri: str, expected: dict[str, RunContent]) -> dict[str, RunContent]:
    """What MLflow holds for the runs of ``expected``."""
    return read_mlflow(MlflowClient(tracking_uri), expected)


def comparable(runs: dict[str, RunContent]) -> dict[str, RunContent]:
    """``runs`` without what differs between two MLflows by nature: MLflow's own run ids and
    the moment the sink created each run."""
    for content in runs.values():
        content.tags.pop("mlflow.parentRunId", None)
        assert content.tags.pop(CREATED_AT_TAG).isdigit()
    return runs


def assert_mlflow_holds(expected: dict[str, RunContent], actual: dict[str, RunContent]) -> None:
    """MLflow holds exactly what the topic says: nothing missing, no extra point or param."""
    report = differences(expected, actual)
    assert report == {}, report
    for key, want in expected.items():
        assert actual[key].params == want.params, key
        assert actual[key].points == want.points, key
        assert actual[key].tags[RUN_KEY_TAG] == key


@dataclass
class Tally:
    """One scenario's accounting, record by record: where did each record of the topic go?"""

    scenario: str
    records_in: int = 0
    in_mlflow: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicated: int = 0

    def save(self) -> None:
        TALLY_DIR.mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() else "-" for c in self.scenario)[:80]
        (TALLY_DIR / f"{name}.json").write_text(json.dumps(asdict(self)))


def tally(
    scenario: str,
    bootstrap: str,
    topic: str,
    tracking_uri: str,
    codec: Codec | None = None,
) -> Tally:
    """Account for every record of ``topic``: in MLflow, dead-lettered, lost or duplicated.

    A record is in MLflow when MLflow holds everything it carries (its run, params with its
    values, every metric point, its tags and artifact as the topic's last word on them, its
    final status). Duplicates are copies beyond the first: a second MLflow run for a run key,
    a metric point stored twice or not in the topic at all, a record dead-lettered twice or
    both dead-lettered and written. The tally is saved for the session's summary table.
    """
    codec = codec or BareCodec()
    result = Tally(scenario)
    letters = Counter(_origin(m) for m in consume_all(bootstrap, f"{topic}.dlq"))
    decoded: list[tuple[tuple[str, int, int], RunEvent | None]] = []
    events: list[SourcedEvent] = []
    for msg in consume_all(bootstrap, topic, timeout=60):
        where = position(msg)
        try:
            event: RunEvent | None = codec.decode(msg.value(), where.topic)
        except DecodeError:
            event = None
        if event is not None:
            events.append(SourcedEvent(event, where))
        decoded.append(((where.topic, where.partition, where.offset), event))
    expected = expected_runs(group_by_run(events))
    actual = read_mlflow(MlflowClient(tracking_uri), expected)
    for origin, event in decoded:
        result.records_in += 1
        landed = event is not None and _landed(event, expected, actual)
        copies = letters.pop(origin, 0)
        result.in_mlflow += landed
        result.dead_lettered += 1 if copies and not landed else 0
        result.lost += 0 if landed or copies else 1
        result.duplicated += copies - 1 if copies and not landed else copies
    result.duplicated += sum(letters.values())  # dead letters of records not in the topic
    for key, got in actual.items():
        result.duplicated += got.copies - 1
        result.duplicated += got.stored_points - len(got.points)
        result.duplicated += len(got.points - expected[key].points)
    result.save()
    return result


def _origin(letter: Message) -> tuple[str, int, int]:
    headers = {k: (v or b"").decode() for k, v in letter.headers() or []}
    return (
        headers[HEADER_PREFIX + "topic"],
        int(headers[HEADER_PREFIX + "partition"]),
        int(headers[HEADER_PREFIX + "offset"]),
    )


def _landed(
    event: RunEvent, expected: dict[str, RunContent], actual: dict[str, RunContent]
) -> bool:
    want, got = expected.get(event.run_key), actual.get(event.run_key)
    if want is None or got is None:
        return False
    payload = event.payload
    if isinstance(payload, RunStarted):
        return got.run_name == want.run_name and want.start_time in (None, got.start_time)
    if isinstance(payload, ParamsLogged):
        return all(got.params.get(k) == v for k, v in payload.params.items())
    if isinstance(payload, MetricsLogged):
        return all(point_id(p) in got.points for p in payload.points)
    if isinstance(payload, TagsSet):
        return all(k in want.tags and got.tags.get(k) == want.tags[k] for k in payload.tags)
    if isinstance(payload, ArtifactLogged):
        path = payload.path
        return path in want.artifacts and got.artifacts.get(path) == want.artifacts[path]
    if isinstance(payload, RunFinished):
        # A later "run finished" supersedes this one: it counts as written once that is.
        return (got.status, got.end_time) == (want.status, want.end_time)
    return False


def assert_nothing_lost_or_duplicated(result: Tally, dead_lettered: int = 0) -> None:
    assert (result.lost, result.duplicated) == (0, 0), result
    assert result.dead_lettered == dead_lettered, result
    assert result.in_mlflow + result.dead_lettered == result.records_in, result


class SteadyLoad:
    """Training jobs publishing at a steady rate from a background thread until stopped.

    Each job is one run: started, three params, ``steps`` metric events of three metrics each,
    finished. Runs follow one another, ``runs_at_once`` interleaved, so partitions and
    batches always hold several runs mid-flight.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        events_per_second: float,
        steps: int = 40,
        runs_at_once: int = 4,
        experiment: str = "steady-load",
    ) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.interval = 1.0 / events_per_second
        self.steps, self.runs_at_once, self.experiment = steps, runs_at_once, experiment
        self.events = 0
        self.runs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish, name="steady-load", daemon=True)
        self.error: BaseException | None = None
        self._codec = BareCodec()

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Finish the runs in flight, flush, and return once every event is acknowledged."""
        self._stop.set()
        self._thread.join(timeout=120)
        if self.error is not None:
            raise AssertionError(f"the load generator failed: {self.error!r}")

    def _publish(self) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        try:
            self._loop(producer)
            if producer.flush(60) != 0:
                raise RuntimeError("events left unacknowledged")
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _send(self, producer: Producer, key: str, payload: Payload) -> None:
        value = self._codec.encode(RunEvent(key, self.experiment, payload), self.topic)
        while True:
            try:
                producer.produce(self.topic, key=key, value=value)
                break
            except BufferError:  # the local queue is full while the broker is away
                producer.poll(0.1)
        producer.poll(0)
        self.events += 1

    def _loop(self, producer: Producer) -> None:
        slots: list[tuple[int, int]] = []  # (run number, next step; -1: not started)
        next_at = time.monotonic()
        number = 0
        while slots or not self._stop.is_set():
            if not self._stop.is_set() and len(slots) < self.runs_at_once:
                slots.append((number, -1))
                number += 1
            run, step = slots.pop(0)
            key = f"{self.topic}-run-{run}"
            now = int(time.time() * 1000)
            if step < 0:
                self._send(producer, key, RunStarted(now, f"load-{run}"))
                self._send(producer, key, ParamsLogged({"lr": str(0.01 * (run % 7 + 1))}))
            else:
                loss = 1.0 / (step + 1)
                points = tuple(
                    MetricPoint(name, value, step, now)
                    for name, value in (("loss", loss), ("acc", 1 - loss), ("lr", 0.01))
                )
                self._send(producer, key, MetricsLogged(points))
            if step + 1 < self.steps and not self._stop.is_set():
                slots.append((run, step + 1))
            else:
                self._send(producer, key, RunFinished("FINISHED", now))
                self.runs += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
