"""Faults on real parts: rebalances during an MLflow outage, records too large to dead-letter."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Producer
from localstack import KafkaBroker, MlflowServer, create_topic

from kafka_mlflow_sink import Publisher
from kafka_mlflow_sink.codec import BareCodec
from kafka_mlflow_sink.deadletter import HEADER_PREFIX
from kafka_mlflow_sink.events import RunEvent, RunFinished, RunStarted
from tests.support import (
    SinkProcess,
    SteadyLoad,
    assert_mlflow_holds,
    assert_nothing_lost_or_duplicated,
    cli,
    consume_all,
    mlflow_runs,
    sink_args,
    tally,
    topic_runs,
    wait_for_zero_lag,
    wait_until,
)

pytestmark = pytest.mark.integration


def publish(bootstrap: str, topic: str, runs: int, points: int) -> None:
    with Publisher(bootstrap, topic, experiment_name="faults") as pub:
        for _ in range(runs):
            with pub.start_run():
                for step in range(points):
                    pub.log_metric("loss", 1 / (step + 1), step=step)


def test_a_rebalance_while_mlflow_is_down_loses_nothing(
    kafka_bootstrap_servers: str,
    mlflow_server: MlflowServer,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic(partitions=4)
    args = sink_args(kafka_bootstrap_servers, events, "pair", mlflow_server.tracking_uri)
    first, second = start_sink(*args), start_sink(*args)
    wait_until(lambda: "partitions assigned" in first.log() + second.log(), 60, "assignment")
    publish(kafka_bootstrap_servers, events, runs=8, points=20)
    wait_for_zero_lag(kafka_bootstrap_servers, events, "pair", first)

    mlflow_server.stop()
    publish(kafka_bootstrap_servers, events, runs=8, points=20)
    wait_until(
        lambda: "MLflow write failed" in first.log() and "MLflow write failed" in second.log(),
        90,
        "both sinks to wait for MLflow",
    )
    assert second.stop() == 0  # its partitions move to the first sink mid-outage
    wait_until(lambda: first.log().count("partitions assigned") >= 2, 60, "the rebalance")
    mlflow_server.start()

    wait_for_zero_lag(kafka_bootstrap_servers, events, "pair", first, timeout=120)
    truth = topic_runs(kafka_bootstrap_servers, events)
    assert len(truth) == 16 and sum(len(r.points) for r in truth.values()) == 16 * 20
    assert_mlflow_holds(truth, mlflow_runs(mlflow_server.tracking_uri, truth))
    result = tally(
        "rebalance while MLflow is down",
        kafka_bootstrap_servers,
        events,
        mlflow_server.tracking_uri,
    )
    assert_nothing_lost_or_duplicated(result)


def test_a_record_too_large_for_the_dead_letter_topic_is_dead_lettered_without_its_value(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic()
    big = b"\x07" * 1_040_000  # the broker takes it; the copy with headers is larger
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap_servers, "message.max.bytes": 2_000_000}
    )
    producer.produce(events, key=b"k", value=big)
    assert producer.flush(10) == 0
    publish(kafka_bootstrap_servers, events, runs=1, points=3)

    sink = start_sink(*sink_args(kafka_bootstrap_servers, events, "big", mlflow_tracking_uri))
    wait_for_zero_lag(kafka_bootstrap_servers, events, "big", sink)
    (dead,) = consume_all(kafka_bootstrap_servers, f"{events}.dlq")
    headers = {k: v.decode() for k, v in dead.headers() or []}
    assert headers[HEADER_PREFIX + "offset"] == "0"
    assert dead.value() == big or headers[HEADER_PREFIX + "value.dropped"] == "1040000 bytes"
    truth = topic_runs(kafka_bootstrap_servers, events)
    assert_mlflow_holds(truth, mlflow_runs(mlflow_tracking_uri, truth))
    result = tally(
        "record too large for the dead-letter topic",
        kafka_bootstrap_servers,
        events,
        mlflow_tracking_uri,
    )
    assert_nothing_lost_or_duplicated(result, dead_lettered=1)


def test_bad_tracking_uris_are_one_line_without_secrets(
    kafka_bootstrap_servers: str,
    topic: Callable[..., str],
) -> None:
    events = topic()
    bad = cli(
        "run", "-b", kafka_bootstrap_servers, "-t", events, "--tracking-uri", "notascheme://x"
    )
    assert bad.returncode == 2 and "tracking URI notascheme://x is not usable" in bad.stderr
    assert "Traceback" not in bad.stderr
    secret = cli(
        "run",
        "-b",
        kafka_bootstrap_servers,
        "-t",
        events,
        "--tracking-uri",
        f"http://alice:s3cret-{uuid.uuid4().hex[:6]}@127.0.0.1:1",
    )
    assert secret.returncode == 3 and "cannot reach MLflow at http://alice:***@127.0.0.1:1" in (
        secret.stderr
    )
    assert "s3cret" not in secret.stderr


def test_a_broker_restart_while_the_sink_runs_loses_nothing(
    kafka_broker: KafkaBroker,
    mlflow_tracking_uri: str,
    start_sink: Callable[..., SinkProcess],
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    events = create_topic(bootstrap, f"restart-{uuid.uuid4().hex[:8]}", partitions=2)
    sink = start_sink(*sink_args(bootstrap, events, "restart", mlflow_tracking_uri))
    publish(bootstrap, events, runs=3, points=10)
    wait_for_zero_lag(bootstrap, events, "restart", sink)

    with SteadyLoad(bootstrap, events, events_per_second=50, steps=10) as load:
        time.sleep(2)
        kafka_broker.restart()  # same port, same storage; the load's producer waits it out
        time.sleep(3)
    wait_for_zero_lag(bootstrap, events, "restart", sink, timeout=120)
    truth = topic_runs(bootstrap, events)
    assert len(truth) == 3 + load.runs
    assert_mlflow_holds(truth, mlflow_runs(mlflow_tracking_uri, truth))
    result = tally("broker restarted under load", bootstrap, events, mlflow_tracking_uri)
    assert_nothing_lost_or_duplicated(result)


def test_a_topic_ending_in_transaction_markers_reaches_zero_lag(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic()
    codec = BareCodec()
    producer = Producer(
        {
            "bootstrap.servers": kafka_bootstrap_servers,
            "transactional.id": f"tx-{uuid.uuid4().hex[:8]}",
        }
    )
    producer.init_transactions(30)
    for abort in (False, True):
        producer.begin_transaction()
        key = uuid.uuid4().hex
        for payload in (RunStarted(1000, "tx"), RunFinished("FINISHED", 2000)):
            producer.produce(
                events, key=key, value=codec.encode(RunEvent(key, "faults", payload), events)
            )
        producer.flush(10)
        if abort:
            producer.abort_transaction(30)
        else:
            producer.commit_transaction(30)
    # The log now ends with an abort marker the sink never sees as a record.
    sink = start_sink(
        *sink_args(kafka_bootstrap_servers, events, "tx", mlflow_tracking_uri),
        "--kafka",
        "isolation.level=read_committed",
    )
    (row,) = wait_for_zero_lag(kafka_bootstrap_servers, events, "tx", sink)
    assert row.end == 6 and row.committed == 6  # 2 + marker, 2 aborted + marker
    truth = topic_runs(kafka_bootstrap_servers, events)
    assert_mlflow_holds(truth, mlflow_runs(mlflow_tracking_uri, truth))
