"""Replay rebuilds MLflow faithfully and idempotently; verify tells whether MLflow holds a topic."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Producer
from localstack import MlflowServer
from mlflow import MlflowClient

from kafka_mlflow_sink import Publisher
from kafka_mlflow_sink.codec import BareCodec
from kafka_mlflow_sink.events import MetricPoint, MetricsLogged, RunEvent, RunFinished, TagsSet
from kafka_mlflow_sink.plan import START_UNKNOWN_TAG
from kafka_mlflow_sink.sink import FAILPOINT_ENV
from tests.support import (
    BIN,
    SinkProcess,
    assert_mlflow_holds,
    assert_nothing_lost_or_duplicated,
    cli,
    comparable,
    lag,
    mlflow_runs,
    sink_args,
    tally,
    topic_runs,
    wait_for_zero_lag,
    wait_until,
)

pytestmark = pytest.mark.integration


def publish_runs(bootstrap: str, topic: str, experiment: str) -> None:
    """Three top-level runs, one with two nested children, and a run whose start is gone."""
    with Publisher(bootstrap, topic, experiment_name=experiment) as pub:
        for i in range(3):
            with pub.start_run(run_name=f"trial-{i}", tags={"i": str(i)}):
                pub.log_params({"lr": 0.1 * (i + 1), "layers": i + 2})
                for step in range(40):
                    pub.log_metrics({"loss": 1 / (step + 1 + i), "acc": step / 40}, step=step)
                pub.log_text(f"model {i}\n", f"models/m{i}.txt")
                if i == 1:
                    for child in range(2):
                        with pub.start_run(run_name=f"fold-{child}", nested=True):
                            pub.log_metric("fold_acc", 0.5 + child / 10, step=child)
    # Retention cut this run's "run started": only later events remain.
    codec, key = BareCodec(), f"gap-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": bootstrap})
    for payload in (
        TagsSet({"note": "started before retention"}),
        MetricsLogged((MetricPoint("loss", 0.5, 7, 1_700_000_000_000),)),
        RunFinished("FINISHED", 1_700_000_100_000),
    ):
        producer.produce(
            topic, key=key, value=codec.encode(RunEvent(key, experiment, payload), topic)
        )
    assert producer.flush(10) == 0


def counts(tracking_uri: str, experiment: str) -> tuple[int, int, int, int]:
    """Runs, params, metric points and artifact files in one experiment."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    params = sum(len(r.data.params) for r in runs)
    points = sum(
        len(client.get_metric_history(r.info.run_id, k)) for r in runs for k in r.data.metrics
    )
    artifacts = sum(len(client.list_artifacts(r.info.run_id, "models")) for r in runs)
    return len(runs), params, points, artifacts


def test_replay_into_an_empty_mlflow_rebuilds_the_same_history_and_twice_changes_nothing(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    mlflow_server: MlflowServer,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events, experiment = topic(partitions=3), f"replay-{uuid.uuid4().hex[:8]}"
    publish_runs(kafka_bootstrap_servers, events, experiment)
    sink = start_sink(*sink_args(kafka_bootstrap_servers, events, "live", mlflow_tracking_uri))
    wait_for_zero_lag(kafka_bootstrap_servers, events, "live", sink)

    def replay_into_b() -> subprocess.CompletedProcess[str]:
        return cli(
            "replay",
            "-b",
            kafka_bootstrap_servers,
            "-t",
            events,
            "--no-progress",
            "--tracking-uri",
            mlflow_server.tracking_uri,
        )

    replayed = replay_into_b()
    assert replayed.returncode == 0, replayed.stderr
    assert "replay complete: 141 records, 6 runs created, 0 found" in replayed.stderr

    for uri in (mlflow_tracking_uri, mlflow_server.tracking_uri):
        verified = cli("verify", "-b", kafka_bootstrap_servers, "-t", events, "--tracking-uri", uri)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "verified 6 runs: 6 match, 0 differ" in verified.stdout

    truth = topic_runs(kafka_bootstrap_servers, events)
    live, rebuilt = (
        mlflow_runs(mlflow_tracking_uri, truth),
        mlflow_runs(mlflow_server.tracking_uri, truth),
    )
    assert_mlflow_holds(truth, rebuilt)
    assert comparable(live) == comparable(rebuilt)
    gap = next(content for key, content in rebuilt.items() if key.startswith("gap-"))
    assert gap.tags[START_UNKNOWN_TAG] == "true" and gap.status == "FINISHED"
    assert sum(1 for c in rebuilt.values() if c.parent_key) == 2

    before = counts(mlflow_server.tracking_uri, experiment)
    assert before == (6, 6, 3 * 80 + 2 + 1, 3)
    again = replay_into_b()
    assert again.returncode == 0, again.stderr
    assert "0 runs created, 6 found, 0 metric points written" in again.stderr
    assert counts(mlflow_server.tracking_uri, experiment) == before


def test_verify_names_what_mlflow_lacks(
    kafka_bootstrap_servers: str,
    topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    events = topic()
    with (
        Publisher(kafka_bootstrap_servers, events, experiment_name="verify") as pub,
        pub.start_run(run_name="only-in-kafka"),
    ):
        pub.log_param("p", 1)
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    missing = cli("verify", "-b", kafka_bootstrap_servers, "-t", events, "--tracking-uri", empty)
    assert missing.returncode == 3 and f"no MLflow store at {empty}" in missing.stderr
    assert not (tmp_path / "empty.db").exists()  # reading never creates a store
    MlflowClient(empty).search_experiments()  # now it exists, and holds nothing
    result = cli("verify", "-b", kafka_bootstrap_servers, "-t", events, "--tracking-uri", empty)
    assert result.returncode == 1
    assert "'only-in-kafka' in 'verify': missing run" in result.stdout
    assert "verified 1 runs: 0 match, 1 differ" in result.stdout


def test_a_sink_killed_between_write_and_commit_neither_loses_nor_duplicates(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic()
    with (
        Publisher(kafka_bootstrap_servers, events, experiment_name="crash") as pub,
        pub.start_run(run_name="crashy"),
    ):
        pub.log_params({"a": 1})
        for step in range(100):
            pub.log_metric("loss", 1 / (step + 1), step=step)
    # A short session lets the restarted sink take over from the killed one quickly.
    args = [
        *sink_args(kafka_bootstrap_servers, events, "crash", mlflow_tracking_uri),
        "--kafka",
        "session.timeout.ms=6000",
    ]
    doomed = start_sink(*args, env={FAILPOINT_ENV: "before-commit"})
    wait_until(lambda: doomed.process.poll() is not None, 90, "the failpoint to kill the sink")
    assert doomed.process.returncode == -9
    (row,) = lag(kafka_bootstrap_servers, events, "crash")
    assert row.committed < 0 and row.lag == 103  # MLflow has the batch, Kafka has no commit
    truth = topic_runs(kafka_bootstrap_servers, events)
    assert_mlflow_holds(truth, mlflow_runs(mlflow_tracking_uri, truth))

    again = start_sink(*args)
    wait_for_zero_lag(kafka_bootstrap_servers, events, "crash", again)
    assert again.stop() == 0
    assert re.search(
        r"stopping: 103 records in \d+ batch(es)?, 0 metric points, 0 runs created, 1 found",
        again.log(),
    ), again.log()
    assert_mlflow_holds(truth, mlflow_runs(mlflow_tracking_uri, truth))
    result = tally(
        "SIGKILL between MLflow write and commit",
        kafka_bootstrap_servers,
        events,
        mlflow_tracking_uri,
    )
    assert_nothing_lost_or_duplicated(result)


def test_replay_from_a_time_within_a_run_from_after_the_end_and_with_empty_partitions(
    kafka_bootstrap_servers: str,
    topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    events = topic(partitions=3)  # one run: two partitions stay empty
    with (
        Publisher(kafka_bootstrap_servers, events, experiment_name="midway") as pub,
        pub.start_run(run_name="long"),
    ):
        for step in range(10):
            pub.log_metric("loss", float(step), step=step)
        pub.flush()
        time.sleep(1.2)
        middle = datetime.now(UTC)
        time.sleep(0.2)
        for step in range(10, 15):
            pub.log_metric("loss", float(step), step=step)
    store = f"sqlite:///{tmp_path / 'b.db'}"
    base = [
        "replay",
        "-b",
        kafka_bootstrap_servers,
        "-t",
        events,
        "--no-progress",
        "--tracking-uri",
        store,
    ]

    result = cli(*base, "--from-timestamp", middle.isoformat())
    assert result.returncode == 0, result.stderr
    assert "replay complete: 6 records, 1 run created" in result.stderr
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("midway").experiment_id])
    assert run.data.tags[START_UNKNOWN_TAG] == "true" and run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(10, 15))

    later = str(int(time.time() * 1000) + 3_600_000)
    result = cli(*base, "--from-timestamp", later)
    assert result.returncode == 0, result.stderr
    assert "replay complete: 0 records, 0 runs created, 0 found, 0 metric points" in result.stderr

    seconds = cli(*base, "--from-timestamp", "1700000000")
    assert seconds.returncode == 2 and "looks like seconds" in seconds.stderr


def test_replay_from_offsets_reads_only_the_named_partitions(
    kafka_bootstrap_servers: str,
    topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    events = topic()
    with (
        Publisher(kafka_bootstrap_servers, events, experiment_name="offsets") as pub,
        pub.start_run(run_name="r"),
    ):
        for step in range(5):
            pub.log_metric("m", float(step), step=step)
    store = f"sqlite:///{tmp_path / 'c.db'}"
    base = ["replay", "-b", kafka_bootstrap_servers, "-t", events, "--no-progress"]
    base += ["--tracking-uri", store]
    result = cli(*base, "--from-offsets", f"{events}:0=4")
    assert result.returncode == 0, result.stderr
    assert "replay complete: 3 records" in result.stderr  # offsets 4, 5 (metrics) and 6 (end)
    assert "3 records in 1 of 1 partition" in result.stderr
    beyond = cli(*base, "--from-offsets", f"{events}:0=99")
    assert beyond.returncode == 0, beyond.stderr
    assert f"{events}[0]: offset 99 is past the partition's end (7): nothing to read" in (
        beyond.stderr
    )
    assert "replay complete: 0 records" in beyond.stderr
    bad = cli(
        "replay",
        "-b",
        kafka_bootstrap_servers,
        "-t",
        events,
        "--tracking-uri",
        store,
        "--from-offsets",
        f"{events}:9=0",
    )
    assert bad.returncode == 2 and f"{events}[9], which is not a partition" in bad.stderr


def test_replay_with_follow_keeps_writing_until_stopped(
    kafka_bootstrap_servers: str,
    topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    events, store = topic(), f"sqlite:///{tmp_path / 'follow.db'}"
    log = tmp_path / "follow.log"
    command = [
        "replay",
        "-b",
        kafka_bootstrap_servers,
        "-t",
        events,
        "--tracking-uri",
        store,
        "--follow",
        "--no-progress",
    ]
    with log.open("w") as out:
        follower = subprocess.Popen([str(BIN / "kafka-mlflow-sink"), *command], stderr=out)
    # By then it has created the store: two processes creating one SQLite store would race.
    wait_until(lambda: "then following" in log.read_text(), 60, "the replay to start")
    with (
        Publisher(kafka_bootstrap_servers, events, experiment_name="follow") as pub,
        pub.start_run(run_name="late"),
    ):
        pub.log_metric("m", 1.0)

    def finished() -> bool:
        client = MlflowClient(store)
        exp = client.get_experiment_by_name("follow")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return bool(runs) and runs[0].info.status == "FINISHED"

    try:
        wait_until(finished, 90, "the following replay to write a run published after it started")
    finally:
        follower.send_signal(signal.SIGTERM)
        follower.wait(timeout=60)
    assert follower.returncode == 0, log.read_text()
    assert "replay stopped: 3 records, 1 run created" in log.read_text()
