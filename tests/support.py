"""Helpers for tests that run the real sink daemon against a real broker and MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer, Message, TopicPartition
from mlflow import MlflowClient

from kafka_mlflow_sink.codec import BareCodec
from kafka_mlflow_sink.config import SinkConfig
from kafka_mlflow_sink.offsets import PartitionLag, group_lag
from kafka_mlflow_sink.plan import RUN_KEY_TAG
from kafka_mlflow_sink.verify import RunContent, differences, read_mlflow, read_topic

BIN = Path(sys.executable).parent


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
    """``runs`` without MLflow's own run ids, so two MLflows can be compared run by run."""
    for content in runs.values():
        content.tags.pop("mlflow.parentRunId", None)
    return runs


def assert_mlflow_holds(expected: dict[str, RunContent], actual: dict[str, RunContent]) -> None:
    """MLflow holds exactly what the topic says: nothing missing, no extra point or param."""
    report = differences(expected, actual)
    assert report == {}, report
    for key, want in expected.items():
        assert actual[key].params == want.params, key
        assert actual[key].points == want.points, key
        assert actual[key].tags[RUN_KEY_TAG] == key
