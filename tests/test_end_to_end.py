"""The whole path on real parts: Publisher -> Kafka broker -> sink daemon -> MLflow server."""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from localstack import MlflowServer

from kafka_mlflow_sink import Publisher
from kafka_mlflow_sink.codec import BareCodec
from kafka_mlflow_sink.deadletter import HEADER_PREFIX
from kafka_mlflow_sink.events import ParamsLogged, RunEvent, RunStarted
from tests.support import (
    SinkProcess,
    assert_mlflow_holds,
    consume_all,
    lag,
    mlflow_runs,
    sink_args,
    topic_runs,
    wait_for_zero_lag,
    wait_until,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def test_example_training_runs_land_in_mlflow_exactly_as_published(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
    tmp_path: Path,
) -> None:
    events = topic(partitions=3)
    experiment = f"digits-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "train_digits.py"),
            "-b",
            kafka_bootstrap_servers,
            "-t",
            events,
            "--experiment",
            experiment,
            "--epochs",
            "6",
        ],
        check=True,
        capture_output=True,
    )
    # A nested run with values the example does not produce: NaN, unicode, an empty tag map.
    with (
        Publisher(kafka_bootstrap_servers, events, experiment_name=experiment) as pub,
        pub.start_run(run_name="sweep ✓"),
    ):
        pub.log_param("grid", "λ∈{0.1, 1}")
        with pub.start_run(run_name="trial-1", nested=True):
            pub.log_metrics({"loss": math.nan, "größe": 2.5}, step=3, timestamp=1234)
            pub.log_bytes(b"\x00\x01binary", "raw/blob.bin")

    sink = start_sink(*sink_args(kafka_bootstrap_servers, events, "e2e", mlflow_tracking_uri))
    rows = wait_for_zero_lag(kafka_bootstrap_servers, events, "e2e", sink)

    truth = topic_runs(kafka_bootstrap_servers, events)
    assert len(truth) == 3
    assert sum(len(v.points) for v in truth.values()) == 6 * 4 + 2
    assert sum(len(v.artifacts) for v in truth.values()) == 2
    assert_mlflow_holds(truth, mlflow_runs(mlflow_tracking_uri, truth))
    assert sum(r.end for r in rows) == len(consume_all(kafka_bootstrap_servers, events))
    assert all(r.committed == r.end for r in rows if r.end > 0)


def test_nothing_is_committed_while_mlflow_is_down(
    kafka_bootstrap_servers: str,
    mlflow_server: MlflowServer,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
    tmp_path: Path,
) -> None:
    events = topic()
    sink = start_sink(
        *sink_args(kafka_bootstrap_servers, events, "down", mlflow_server.tracking_uri)
    )
    wait_until(lambda: "partitions assigned" in sink.log(), 60, "the sink to join its group")
    mlflow_server.stop()

    with (
        Publisher(kafka_bootstrap_servers, events, experiment_name="outage") as pub,
        pub.start_run(run_name="during-outage"),
    ):
        pub.log_params({"a": 1, "b": 2})
        for step in range(50):
            pub.log_metric("loss", 1 / (step + 1), step=step)

    wait_until(lambda: "MLflow write failed" in sink.log(), 60, "the sink to notice MLflow down")
    wait_until(lambda: "attempt 3 failed" in sink.log(), 60, "a few retries")
    (row,) = lag(kafka_bootstrap_servers, events, "down")
    assert row.committed < 0 and row.lag == row.end == 53  # started, params, 50 metrics, finished
    assert sink.log().count("MLflow write failed") == 1  # one WARNING, not one per attempt

    mlflow_server.start()
    wait_for_zero_lag(kafka_bootstrap_servers, events, "down", sink)
    truth = topic_runs(kafka_bootstrap_servers, events)
    assert_mlflow_holds(truth, mlflow_runs(mlflow_server.tracking_uri, truth))
    assert "partitions resumed" in sink.log()


def test_a_corrupt_record_is_dead_lettered_and_its_neighbours_land(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
    tmp_path: Path,
) -> None:
    events = topic()
    codec = BareCodec()
    key = uuid.uuid4().hex
    good = [
        codec.encode(RunEvent(key, "corrupt-neighbours", RunStarted(1000, "neighbours")), events),
        codec.encode(RunEvent(key, "corrupt-neighbours", ParamsLogged({"kept": "yes"})), events),
    ]
    producer = Producer({"bootstrap.servers": kafka_bootstrap_servers})
    producer.produce(events, key=key, value=good[0])
    producer.produce(events, key=key, value=b"\x07 this is not avro", headers=[("trace", b"t-1")])
    producer.produce(events, key=key, value=good[1])
    assert producer.flush(10) == 0

    sink = start_sink(*sink_args(kafka_bootstrap_servers, events, "corrupt", mlflow_tracking_uri))
    (row,) = wait_for_zero_lag(kafka_bootstrap_servers, events, "corrupt", sink)
    assert row.committed == 3

    (dead,) = consume_all(kafka_bootstrap_servers, f"{events}.dlq")
    headers = {k: v.decode() for k, v in dead.headers() or []}
    assert dead.value() == b"\x07 this is not avro" and dead.key() == key.encode()
    assert headers["trace"] == "t-1"
    assert headers[HEADER_PREFIX + "topic"] == events
    assert headers[HEADER_PREFIX + "partition"] == "0"
    assert headers[HEADER_PREFIX + "offset"] == "1"
    assert headers[HEADER_PREFIX + "exception.class.name"] == "DecodeError"
    assert "not a bare Avro run event" in headers[HEADER_PREFIX + "exception.message"]

    truth = topic_runs(kafka_bootstrap_servers, events)
    view = mlflow_runs(mlflow_tracking_uri, truth)[key]
    assert view.run_name == "neighbours" and view.params == {"kept": "yes"}
