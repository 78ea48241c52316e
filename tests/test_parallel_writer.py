"""Several runs written at once through a real tracking server, and what stops them."""

from __future__ import annotations

import time
import uuid

import pytest

from kafka_mlflow_sink.errors import Abandoned, TransientWriteError
from kafka_mlflow_sink.events import (
    MetricPoint,
    MetricsLogged,
    ParamsLogged,
    Payload,
    RunEvent,
    RunFinished,
    RunStarted,
)
from kafka_mlflow_sink.plan import Position, SourcedEvent, group_by_run
from kafka_mlflow_sink.verify import differences, expected_runs, read_mlflow
from kafka_mlflow_sink.writer import MlflowWriter, _families
from tests.throttling_proxy import ThrottlingProxy

pytestmark = pytest.mark.integration


def family_batch(experiment: str, families: int) -> list[SourcedEvent]:
    """``families`` parents, each with a child and a grandchild, 40 points per run."""
    events: list[SourcedEvent] = []

    def add(key: str, payload: Payload) -> None:
        position = Position("t", len(events) % 3, len(events))
        events.append(SourcedEvent(RunEvent(key, experiment, payload), position))

    for family in range(families):
        parent = None
        for depth in range(3):
            key = f"{experiment}-{family}-{depth}"
            add(key, RunStarted(1000 + depth, f"run-{family}-{depth}", parent_run_key=parent))
            add(key, ParamsLogged({"depth": str(depth)}))
            points = tuple(MetricPoint("loss", 1 / (s + 1), s, 2000 + s) for s in range(40))
            add(key, MetricsLogged(points))
            add(key, RunFinished("FINISHED", 3000 + depth))
            parent = key
    return events


def test_families_keep_a_child_after_its_parent_and_split_the_rest() -> None:
    runs = group_by_run(family_batch("families", 3))
    groups = _families(runs)
    assert [[r.run_key for r in group] for group in groups] == [
        [f"families-{f}-{d}" for d in range(3)] for f in range(3)
    ]


def test_runs_written_at_once_land_exactly_and_a_second_pass_adds_nothing(
    mlflow_tracking_uri: str,
) -> None:
    experiment = f"parallel-{uuid.uuid4().hex[:8]}"
    events = family_batch(experiment, 6)
    writer = MlflowWriter(mlflow_tracking_uri, parallelism=4)
    try:
        report = writer.apply(group_by_run(events))
        assert (report.runs_created, report.points, report.rejected) == (18, 18 * 40, [])
        expected = expected_runs(group_by_run(events))
        assert differences(expected, read_mlflow(writer.client, expected)) == {}
        again = MlflowWriter(mlflow_tracking_uri, parallelism=4)  # nothing cached
        second = again.apply(group_by_run(events))
        assert (second.runs_created, second.runs_found, second.points) == (0, 18, 0)
        again.close()
    finally:
        writer.close()


def test_a_stop_during_parallel_writes_stops_every_thread_and_the_redo_duplicates_nothing(
    mlflow_tracking_uri: str,
) -> None:
    experiment = f"parallel-stop-{uuid.uuid4().hex[:8]}"
    events = family_batch(experiment, 8)
    writer = MlflowWriter(mlflow_tracking_uri, parallelism=4)
    calls = 0

    def stop_soon() -> None:
        nonlocal calls
        calls += 1
        if calls >= 2:
            raise Abandoned("stop requested")

    try:
        with pytest.raises(Abandoned):
            writer.apply(group_by_run(events), between=stop_soon)
        redo = writer.apply(group_by_run(events))
        expected = expected_runs(group_by_run(events))
        actual = read_mlflow(writer.client, expected)
        assert differences(expected, actual) == {}
        assert all(run.copies == 1 for run in actual.values())
        assert redo.rejected == [] and redo.runs_created < 24  # some were written before the stop
    finally:
        writer.close()


def test_a_throttled_run_fails_the_whole_batch_and_the_retry_writes_it_once(
    mlflow_tracking_uri: str,
) -> None:
    experiment = f"parallel-throttle-{uuid.uuid4().hex[:8]}"
    events = family_batch(experiment, 4)
    with ThrottlingProxy(mlflow_tracking_uri) as proxy:
        writer = MlflowWriter(proxy.url, parallelism=4)
        try:
            proxy.throttle_next(429, "1")
            with pytest.raises(TransientWriteError, match="HTTP 429"):
                writer.apply(group_by_run(events))
            writer.apply(group_by_run(events))
        finally:
            writer.close()
    expected = expected_runs(group_by_run(events))
    actual = read_mlflow(MlflowWriter(mlflow_tracking_uri).client, expected)
    assert differences(expected, actual) == {}


def test_a_create_that_times_out_but_lands_later_is_found_not_created_twice(
    mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as the CLI sets it
    experiment = f"late-create-{uuid.uuid4().hex[:8]}"
    events = family_batch(experiment, 1)[:2]  # one run: started, params
    with ThrottlingProxy(mlflow_tracking_uri) as proxy:
        writer = MlflowWriter(proxy.url)
        proxy.delay_next("runs/create", 4.0)  # the client gives up after 2 s
        with pytest.raises(TransientWriteError, match="timed out"):
            writer.apply(group_by_run(events))
        with pytest.raises(TransientWriteError, match="may still land in MLflow"):
            writer.apply(group_by_run(events))  # at once: the late create is not in yet
        deadline = time.monotonic() + 30
        while True:
            try:
                report = writer.apply(group_by_run(events))
                break
            except TransientWriteError:
                assert time.monotonic() < deadline, "the late create never appeared"
                time.sleep(0.5)
    assert (report.runs_created, report.runs_found) == (0, 1)
    expected = expected_runs(group_by_run(events))
    actual = read_mlflow(MlflowWriter(mlflow_tracking_uri).client, expected)
    assert differences(expected, actual) == {}
