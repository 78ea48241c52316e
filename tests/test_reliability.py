"""Counted fault scenarios: every record of the topic ends up in MLflow or the dead-letter topic.

Each test runs the real sink daemon against a real broker and a real ``mlflow server`` while
something goes wrong, then accounts for every record with ``tally``: lost and duplicated
must both be 0. The session prints the tallies as one table.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from localstack import MlflowServer

from kafka_mlflow_sink.codec import BareCodec
from kafka_mlflow_sink.events import (
    MetricPoint,
    MetricsLogged,
    ParamsLogged,
    Payload,
    RunEvent,
    RunFinished,
    RunStarted,
)
from kafka_mlflow_sink.plan import RUN_KEY_TAG, Position, SourcedEvent, group_by_run
from kafka_mlflow_sink.writer import MlflowWriter
from tests.support import (
    TALLY_DIR,
    SinkProcess,
    SteadyLoad,
    assert_nothing_lost_or_duplicated,
    lag,
    sink_args,
    tally,
    wait_for_zero_lag,
    wait_until,
)
from tests.throttling_proxy import ThrottlingProxy

pytestmark = pytest.mark.integration

# A short session lets a surviving member take over a killed one's partitions quickly.
FAST_TAKEOVER = ("--kafka", "session.timeout.ms=6000")
# Calls of one attempt arrive together: writer threads stop within milliseconds of a failure.
IN_FLIGHT = 0.2


def committed(bootstrap: str, topic: str, group: str) -> list[int]:
    return [row.committed for row in lag(bootstrap, topic, group)]


@pytest.mark.slow
def test_mlflow_down_for_a_minute_while_events_keep_arriving(
    kafka_bootstrap_servers: str,
    mlflow_server: MlflowServer,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic(partitions=2)
    sink = start_sink(
        *sink_args(kafka_bootstrap_servers, events, "outage", mlflow_server.tracking_uri),
        "--stats-interval",
        "20",
    )
    with SteadyLoad(kafka_bootstrap_servers, events, events_per_second=40) as load:
        wait_until(lambda: "committed" in sink.log(), 60, "the first commits")
        mlflow_server.stop()
        wait_until(lambda: "MLflow write failed" in sink.log(), 60, "the sink to notice")
        frozen = committed(kafka_bootstrap_servers, events, "outage")
        arrived = load.events
        time.sleep(60)
        # A minute of events arrived and nothing was committed past what MLflow had.
        assert load.events - arrived >= 40 * 50
        assert committed(kafka_bootstrap_servers, events, "outage") == frozen
        mlflow_server.start()
        wait_until(lambda: "partitions resumed" in sink.log(), 120, "MLflow to be back")
    wait_for_zero_lag(kafka_bootstrap_servers, events, "outage", sink, timeout=180)

    log = sink.log()
    assert log.count("MLflow write failed") == 1, "one WARNING per outage, not one per attempt"
    assert "still waiting for MLflow after" in log  # a reminder on every stats interval
    # Polling went on throughout: the member kept its partitions, no eviction, no rejoin.
    assert log.count("partitions assigned") == 1 and "partitions revoked" not in log
    result = tally(
        "MLflow stopped 60 s under load",
        kafka_bootstrap_servers,
        events,
        mlflow_server.tracking_uri,
    )
    assert_nothing_lost_or_duplicated(result)
    assert result.records_in == load.events


def test_a_second_instance_joining_mid_stream(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic(partitions=4)
    args = sink_args(kafka_bootstrap_servers, events, "join", mlflow_tracking_uri)
    first = start_sink(*args)
    with SteadyLoad(kafka_bootstrap_servers, events, events_per_second=150) as load:
        wait_until(lambda: "committed" in first.log(), 60, "the first sink to commit")
        second = start_sink(*args)
        wait_until(lambda: "committed" in second.log(), 60, "the second sink to take partitions")
        time.sleep(5)
    wait_for_zero_lag(kafka_bootstrap_servers, events, "join", first)
    result = tally(
        "second sink joins the group mid-stream",
        kafka_bootstrap_servers,
        events,
        mlflow_tracking_uri,
    )
    assert_nothing_lost_or_duplicated(result)
    assert result.records_in == load.events


def test_one_of_two_instances_killed_mid_stream(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic(partitions=4)
    args = [
        *sink_args(kafka_bootstrap_servers, events, "pair", mlflow_tracking_uri),
        *FAST_TAKEOVER,
    ]
    survivor, doomed = start_sink(*args), start_sink(*args)
    with SteadyLoad(kafka_bootstrap_servers, events, events_per_second=150) as load:
        wait_until(lambda: "committed" in doomed.log(), 60, "both sinks to commit")
        time.sleep(2)
        # Whether the survivor was assigned once or twice before depends on how the two joins
        # interleaved; the takeover is the assignment naming every partition, after the kill.
        before = len(survivor.log())
        doomed.process.kill()
        assert doomed.process.wait(10) == -signal.SIGKILL
        everything = ", ".join(f"{events}[{p}]" for p in range(4))
        wait_until(
            lambda: f"partitions assigned: {everything}" in survivor.log()[before:],
            60,
            "the survivor's takeover",
        )
        time.sleep(3)
    wait_for_zero_lag(kafka_bootstrap_servers, events, "pair", survivor)
    result = tally(
        "one of two sinks SIGKILLed mid-stream",
        kafka_bootstrap_servers,
        events,
        mlflow_tracking_uri,
    )
    assert_nothing_lost_or_duplicated(result)
    assert result.records_in == load.events


def test_the_sink_killed_mid_batch_again_and_again(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic(partitions=2)
    args = [
        *sink_args(kafka_bootstrap_servers, events, "kills", mlflow_tracking_uri),
        *FAST_TAKEOVER,
    ]
    kills = 0
    with SteadyLoad(kafka_bootstrap_servers, events, events_per_second=200) as load:
        for _ in range(3):
            sink = start_sink(*args)
            # Kill while batches are in flight: one has started, none need have committed.
            wait_until(sink.log_contains("partitions assigned"), 60, "the sink to join")
            time.sleep(1.5)
            sink.process.send_signal(signal.SIGKILL)
            sink.process.wait(10)
            kills += 1
        last = start_sink(*args)
    wait_for_zero_lag(kafka_bootstrap_servers, events, "kills", last, timeout=120)
    result = tally(
        "sink SIGKILLed mid-batch 3 times under load",
        kafka_bootstrap_servers,
        events,
        mlflow_tracking_uri,
    )
    assert_nothing_lost_or_duplicated(result)
    assert kills == 3 and result.records_in == load.events


def test_throttling_answers_slow_the_sink_down_as_long_as_asked(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic()
    with ThrottlingProxy(mlflow_tracking_uri) as proxy:
        proxy.throttle_next(429, "3")
        proxy.throttle_next(503, "2")
        proxy.throttle_next(429, None)
        sink = start_sink(*sink_args(kafka_bootstrap_servers, events, "throttled", proxy.url))
        with SteadyLoad(kafka_bootstrap_servers, events, events_per_second=100, steps=10) as load:
            time.sleep(3)
        wait_for_zero_lag(kafka_bootstrap_servers, events, "throttled", sink)
        assert sink.stop() == 0
        calls = proxy.log_batch_calls()

    assert [c.status for c in calls[:3]] == [429, 503, 429] and calls[3].status == 200
    # Writer threads may have had calls in flight together when an answer came, so the two
    # answers asking for a pause may belong to one attempt; every call sent after such an
    # answer came no sooner than it asked. Without Retry-After the first backoff waits are
    # well under a second, so this fails if either pause is ignored.
    for answered, pause in zip(calls[:2], (3.0, 2.0), strict=True):
        later = [c for c in calls if c.at > answered.at + IN_FLIGHT]
        assert later and later[0].at - answered.at >= pause, calls
    log = sink.log()
    assert "MLflow is busy (HTTP 429, Retry-After 3s): REQUEST_LIMIT_EXCEEDED: slow down" in log
    assert log.count("MLflow write failed") == 1
    result = tally(
        "MLflow answers 429/503 with Retry-After",
        kafka_bootstrap_servers,
        events,
        mlflow_tracking_uri,
    )
    assert_nothing_lost_or_duplicated(result)
    assert result.records_in == load.events


def test_a_locked_sqlite_database_is_waited_for_not_dead_lettered(
    kafka_bootstrap_servers: str,
    mlflow_server: MlflowServer,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic()
    sink = start_sink(
        *sink_args(kafka_bootstrap_servers, events, "locked", mlflow_server.tracking_uri),
        # Long enough to receive the server's answer rather than give up on it first.
        env={"MLFLOW_HTTP_REQUEST_TIMEOUT": "60"},
    )
    wait_until(lambda: "partitions assigned" in sink.log(), 60, "the sink to join")
    database = sqlite3.connect(mlflow_server.workdir / "mlflow.db", isolation_level=None)
    try:
        database.execute("BEGIN IMMEDIATE")  # readers go on, every writer waits, then fails
        with SteadyLoad(kafka_bootstrap_servers, events, events_per_second=50, steps=10) as load:
            wait_until(lambda: "MLflow write failed" in sink.log(), 90, "a failed write")
            time.sleep(25)  # more attempts meet the lock
        database.execute("ROLLBACK")
    finally:
        database.close()
    wait_for_zero_lag(kafka_bootstrap_servers, events, "locked", sink, timeout=120)
    log = sink.log()
    # MLflow answers a locked SQLite database with 503 TEMPORARILY_UNAVAILABLE.
    assert "503" in log.split("MLflow write failed")[1].splitlines()[0]
    result = tally(
        "SQLite MLflow reports 'database is locked'",
        kafka_bootstrap_servers,
        events,
        mlflow_server.tracking_uri,
    )
    assert_nothing_lost_or_duplicated(result)
    assert result.records_in == load.events


def test_the_tally_notices_lost_and_duplicated_records(
    kafka_bootstrap_servers: str, topic: Callable[..., str], tmp_path: Path
) -> None:
    events = topic()
    codec = BareCodec()
    key = "tally-run"
    payloads: list[Payload] = [
        RunStarted(1000, "tallied"),
        ParamsLogged({"lr": "0.1"}),
        MetricsLogged(tuple(MetricPoint("loss", 1 / (s + 1), s, 1000 + s) for s in range(3))),
        RunFinished("FINISHED", 2000),
    ]
    producer = Producer({"bootstrap.servers": kafka_bootstrap_servers})
    for payload in payloads:
        producer.produce(
            events, key=key, value=codec.encode(RunEvent(key, "tally", payload), events)
        )
    producer.produce(events, key=key, value=b"not avro, and never dead-lettered")
    assert producer.flush(10) == 0
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    nothing = tally("(self-check) nothing written", kafka_bootstrap_servers, events, store)
    assert (nothing.records_in, nothing.in_mlflow, nothing.lost) == (5, 0, 5)

    writer = MlflowWriter(store)
    sourced = [
        SourcedEvent(RunEvent(key, "tally", p), Position(events, 0, i))
        for i, p in enumerate(payloads)
    ]
    writer.apply(group_by_run(sourced))
    written = tally("(self-check) all but the garbage", kafka_bootstrap_servers, events, store)
    assert (written.in_mlflow, written.lost, written.duplicated) == (4, 1, 0)

    (run,) = writer.client.search_runs(
        [writer.client.get_experiment_by_name("tally").experiment_id]
    )
    writer.client.log_metric(run.info.run_id, "loss", 42.0, timestamp=5, step=9)
    writer.client.create_run(run.info.experiment_id, tags={RUN_KEY_TAG: key})
    doubled = tally(
        "(self-check) a stray point and a second run", kafka_bootstrap_servers, events, store
    )
    assert (doubled.in_mlflow, doubled.lost, doubled.duplicated) == (4, 1, 2)
    for self_check in TALLY_DIR.glob("-self-check-*.json"):
        self_check.unlink()  # not a scenario of the product
