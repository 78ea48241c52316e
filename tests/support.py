"""Helpers for tests that run the real sink daemon against a real broker and MLflow."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, Message, TopicPartition
from mlflow import MlflowClient

from kafka_mlflow_sink.codec import BareCodec
from kafka_mlflow_sink.config import SinkConfig
from kafka_mlflow_sink.events import (
    ArtifactLogged,
    MetricsLogged,
    ParamsLogged,
    RunFinished,
    RunStarted,
    TagsSet,
)
from kafka_mlflow_sink.offsets import PartitionLag, group_lag
from kafka_mlflow_sink.plan import RUN_KEY_TAG

BIN = Path(sys.executable).parent


class SinkProcess:
    """``kafka-mlflow-sink run`` as a child process, logging to a file."""

    def __init__(self, log_file: Path, *args: str) -> None:
        self.log_file = log_file
        self.args = args
        with log_file.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [str(BIN / "kafka-mlflow-sink"), "run", "--batch-max-wait", "0.2", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"},
            )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code; the daemon must stop by itself within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


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


@dataclass
class RunView:
    """What a run holds, in terms the topic and MLflow can both be read into."""

    experiment: str = ""
    run_name: str | None = None
    start_time: int | None = None
    end_time: int | None = None
    status: str = "RUNNING"
    parent_key: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    points: set[tuple[str, float | str, int, int]] = field(default_factory=set)
    artifacts: dict[str, bytes] = field(default_factory=dict)


def _point(key: str, value: float, step: int, timestamp: int) -> tuple[str, float | str, int, int]:
    return (key, "nan" if math.isnan(value) else value, step, timestamp)


def topic_truth(bootstrap: str, topic: str) -> dict[str, RunView]:
    """What the topic says every run holds, folded in offset order."""
    runs: dict[str, RunView] = {}
    for msg in consume_all(bootstrap, topic):
        event = BareCodec().decode(msg.value(), topic)
        view = runs.setdefault(event.run_key, RunView(experiment=event.experiment_name))
        payload = event.payload
        if isinstance(payload, RunStarted):
            view.run_name, view.start_time = payload.run_name, payload.start_time
            view.parent_key = payload.parent_run_key
            view.tags.update(payload.tags)
        elif isinstance(payload, ParamsLogged):
            for key, value in payload.params.items():
                view.params.setdefault(key, value)
        elif isinstance(payload, MetricsLogged):
            view.points.update(_point(*p) for p in payload.points)
        elif isinstance(payload, TagsSet):
            view.tags.update(payload.tags)
        elif isinstance(payload, ArtifactLogged):
            view.artifacts[payload.path] = payload.content
        elif isinstance(payload, RunFinished):
            view.status, view.end_time = payload.status, payload.end_time
    return runs


def mlflow_view(tracking_uri: str, run_keys: list[str], tmp: Path) -> dict[str, RunView]:
    """What MLflow holds for each run key, with every metric point and artifact byte."""
    client = MlflowClient(tracking_uri)
    views: dict[str, RunView] = {}
    id_to_key: dict[str, str] = {}
    experiments = [e.experiment_id for e in client.search_experiments()]
    for key in run_keys:
        found = client.search_runs(experiments, filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")
        assert len(found) <= 1, f"run key {key} has {len(found)} runs in MLflow"
        if not found:
            continue
        run = found[0]
        id_to_key[run.info.run_id] = key
        view = RunView(
            experiment=client.get_experiment(run.info.experiment_id).name,
            run_name=run.info.run_name,
            start_time=run.info.start_time,
            end_time=run.info.end_time,
            status=run.info.status,
            params=dict(run.data.params),
            tags=dict(run.data.tags),
        )
        for metric in run.data.metrics:
            view.points.update(
                _point(m.key, m.value, m.step, m.timestamp)
                for m in client.get_metric_history(run.info.run_id, metric)
            )
        target = tmp / run.info.run_id
        for path in _artifact_files(client, run.info.run_id, None):
            local = client.download_artifacts(run.info.run_id, path, str(target))
            view.artifacts[path] = Path(local).read_bytes()
        views[key] = view
    for view in views.values():
        parent_id = view.tags.get("mlflow.parentRunId")
        view.parent_key = id_to_key.get(parent_id) if parent_id else None
    return views


def _artifact_files(client: MlflowClient, run_id: str, path: str | None) -> list[str]:
    files: list[str] = []
    for info in client.list_artifacts(run_id, path):
        files.extend(_artifact_files(client, run_id, info.path) if info.is_dir else [info.path])
    return files


def assert_mlflow_holds(truth: dict[str, RunView], mlflow: dict[str, RunView]) -> None:
    """MLflow holds exactly what the topic says, run by run."""
    assert sorted(mlflow) == sorted(truth), "run keys differ between the topic and MLflow"
    for key, want in truth.items():
        got = mlflow[key]
        assert got.experiment == want.experiment, key
        assert got.run_name == want.run_name, key
        assert (got.start_time, got.end_time, got.status) == (
            want.start_time,
            want.end_time,
            want.status,
        ), key
        assert got.parent_key == want.parent_key, key
        assert got.params == want.params, key
        assert {k: got.tags.get(k) for k in want.tags} == want.tags, key
        assert got.tags[RUN_KEY_TAG] == key
        assert got.points == want.points, key
        assert got.artifacts == want.artifacts, key
