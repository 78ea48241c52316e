"""The MLflow writer against a real embedded MLflow store (SQLite in a temporary folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kafka_mlflow_sink.errors import TransientWriteError, concise
from kafka_mlflow_sink.events import (
    ArtifactLogged,
    MetricPoint,
    MetricsLogged,
    Payload,
    RunEvent,
    RunFinished,
    RunStarted,
)
from kafka_mlflow_sink.plan import Position, SourcedEvent, group_by_run
from kafka_mlflow_sink.writer import MlflowWriter, classify


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def batch(*payloads: Payload, key: str = "run-1", first: int = 0) -> list[SourcedEvent]:
    return [
        SourcedEvent(RunEvent(key, "writer", p), Position("t", 0, first + i))
        for i, p in enumerate(payloads)
    ]


def test_a_record_refused_by_mlflow_stays_refused_when_the_batch_is_retried(store: str) -> None:
    writer = MlflowWriter(store)
    report = writer.apply(group_by_run(batch(RunStarted(1, "r"))))
    assert report.runs_created == 1
    run_id = writer.client.search_runs(["1"])[0].info.run_id
    writer.client.delete_run(run_id)  # the cached run is now deleted in MLflow

    late = batch(MetricsLogged((MetricPoint("m", 1.0, 0, 5),)), first=1)
    first = writer.apply(group_by_run(late))
    assert [r.position.offset for r in first.rejected] == [1]
    again = writer.apply(group_by_run(late))  # a retry of the same batch
    assert [r.position.offset for r in again.rejected] == [1]
    assert "deleted" in again.rejected[0].reason


def test_a_finished_run_leaves_the_cache_and_a_late_event_still_adds_nothing_twice(
    store: str,
) -> None:
    writer = MlflowWriter(store)
    points = tuple(MetricPoint("m", float(s), s, 5 + s) for s in range(50))
    whole = batch(RunStarted(1, "r"), MetricsLogged(points), RunFinished("FINISHED", 9))
    writer.apply(group_by_run(whole))
    assert len(writer._runs) == 0  # memory does not grow with every run ever finished

    late = batch(MetricsLogged((*points[:10], MetricPoint("m", 7.5, 99, 200))), first=3)
    report = writer.apply(group_by_run(late))  # redelivered points and one new one
    assert (report.runs_created, report.runs_found, report.points) == (0, 1, 1)
    (run,) = writer.client.search_runs(["1"])
    assert len(writer.client.get_metric_history(run.info.run_id, "m")) == 51


def test_a_refused_end_rejects_only_its_record(store: str) -> None:
    writer = MlflowWriter(store)
    writer.apply(group_by_run(batch(RunStarted(1, "r"))))
    writer.client.delete_run(writer.client.search_runs(["1"])[0].info.run_id)
    report = writer.apply(
        group_by_run(batch(ArtifactLogged("a.txt", b"x"), RunFinished("FINISHED", 9), first=1))
    )
    assert [r.position.offset for r in report.rejected] == [2]


def test_an_error_mlflow_keeps_returning_becomes_a_refusal_once_escalated(store: str) -> None:
    writer = MlflowWriter(store)
    clash = batch(RunStarted(1, "r"), ArtifactLogged("x", b"file"), ArtifactLogged("x/y.txt", b"2"))
    with pytest.raises(TransientWriteError) as caught:
        writer.apply(group_by_run(clash))
    assert caught.value.ambiguous
    writer.escalate_ambiguous = True
    report = writer.apply(group_by_run(clash))
    assert [r.position.offset for r in report.rejected] == [2]
    assert "persisting while MLflow answers" in report.rejected[0].reason


@pytest.mark.parametrize(
    ("text", "ambiguous"),
    [
        (
            "API request to http://h/api failed with exception HTTPConnectionPool(host='h', "
            "port=1): Max retries exceeded (Caused by NewConnectionError('Connection refused'))",
            False,
        ),
        ("API request failed: too many 500 error responses", True),
        ("(sqlite3.OperationalError) database is locked", False),
        ("Response: 503 Service Unavailable", False),
    ],
)
def test_outages_are_never_ambiguous(text: str, ambiguous: bool) -> None:
    from mlflow.exceptions import MlflowException

    error = classify(MlflowException(text), "log_batch")
    assert isinstance(error, TransientWriteError) and error.ambiguous is ambiguous


@pytest.mark.parametrize(
    ("raw", "short"),
    [
        (
            "API request to http://m:1/api/2.0/mlflow/experiments/search failed with exception "
            "HTTPConnectionPool(host='m', port=1): Max retries exceeded with url: /api/2.0/mlf"
            'low/experiments/search?max_results=1 (Caused by NewConnectionError("HTTPConnecti'
            "on(host='m', port=1): Failed to establish a new connection: [Errno 111] Connection"
            ' refused"))',
            "API request to http://m:1/api/2.0/mlflow/experiments/search failed: Connection "
            "refused",
        ),
        (
            "API request to http://m:1/api/2.0/mlflow/runs/log-batch failed with exception "
            "HTTPConnectionPool(host='m', port=1): Max retries exceeded with url: /api/2.0/mlf"
            "low/runs/log-batch (Caused by ResponseError('too many 503 error responses'))",
            "API request to http://m:1/api/2.0/mlflow/runs/log-batch failed: too many 503 error "
            "responses",
        ),
        (
            "API request to http://m:1/api/2.0/mlflow/runs/create failed with timeout exception "
            "HTTPConnectionPool(host='m', port=1): Read timed out. (read timeout=5).",
            "API request to http://m:1/api/2.0/mlflow/runs/create failed: timed out",
        ),
        (
            "API request to endpoint /api/2.0/mlflow/runs/create failed with error code 404 != "
            "200. Response body: '<!doctype html> <html lang=en><title>404 Not Found</title>'",
            "API request to endpoint /api/2.0/mlflow/runs/create failed with error code 404 != "
            "200. Response body: (an HTML page: is this the right URL?)",
        ),
        (
            "TEMPORARILY_UNAVAILABLE: (sqlite3.OperationalError) database is locked [SQL: SELECT "
            "runs.run_uuid AS runs_run_uuid FROM runs WHERE runs.run_uuid = ?] [parameters: "
            "('abc',)] (Background on this error at: https://sqlalche.me/e/20/e3q8)",
            "TEMPORARILY_UNAVAILABLE: (sqlite3.OperationalError) database is locked",
        ),
    ],
)
def test_http_errors_are_told_in_a_few_words(raw: str, short: str) -> None:
    assert concise(raw) == short


def test_mlflows_error_code_is_named_once() -> None:
    from mlflow.exceptions import RestException

    plain = RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad value"})
    assert classify(plain, "log").reason == "log: INVALID_PARAMETER_VALUE: bad value"


def test_the_user_part_of_a_uri_is_masked_in_errors() -> None:
    error = classify(OSError("cannot reach http://alice:s3cret@mlflow:5000/api"), "log_batch")
    assert "s3cret" not in error.reason and "alice:***@" in error.reason


@pytest.mark.parametrize("mine_was_first", [False, True])
def test_a_run_created_twice_at_once_settles_on_the_one_created_first(
    store: str, mine_was_first: bool
) -> None:
    """Whatever the run ids: the writer whose run came second yields, the other keeps its own.

    Both runs have the start time of the same "run started" event, so only the creation time
    the sink tags each run with can tell them apart.
    """
    import time

    from kafka_mlflow_sink.plan import CREATED_AT_TAG, RUN_KEY_TAG

    writer = MlflowWriter(store)
    writer.apply(group_by_run(batch(RunStarted(1, "r"), key="k")))
    (theirs,) = writer.client.search_runs(["1"])
    theirs_at = int(theirs.data.tags[CREATED_AT_TAG])
    assert abs(theirs_at - time.time() * 1000) < 60_000
    # A second writer created its own run for the key at about the same moment.
    mine_at = theirs_at - 5 if mine_was_first else theirs_at + 5
    tags = {RUN_KEY_TAG: "k", CREATED_AT_TAG: str(mine_at)}
    mine = writer.client.create_run("1", start_time=1, tags=tags).info.run_id
    kept = writer._settle_creation("1", "k", mine)
    if mine_was_first:
        assert kept is None  # ours is the one every writer keeps
        assert writer.client.get_run(mine).info.lifecycle_stage == "active"
    else:
        assert kept is not None and kept.run_id == theirs.info.run_id
        assert writer.client.get_run(mine).info.lifecycle_stage == "deleted"


def test_verify_reports_a_run_key_held_by_two_runs(store: str) -> None:
    from kafka_mlflow_sink.plan import RUN_KEY_TAG
    from kafka_mlflow_sink.verify import differences, expected_runs, read_mlflow

    events = batch(RunStarted(1, "r"), key="k")
    writer = MlflowWriter(store)
    writer.apply(group_by_run(events))
    writer.client.create_run("1", start_time=1, tags={RUN_KEY_TAG: "k"}, run_name="r")
    expected = expected_runs(group_by_run(events))
    report = differences(expected, read_mlflow(writer.client, expected))
    assert report == {"k": ["2 MLflow runs carry this run key; expected one"]}


def test_a_child_written_before_its_parent_is_linked_when_the_parent_arrives(store: str) -> None:
    from kafka_mlflow_sink.verify import differences, expected_runs, read_mlflow

    child = batch(RunStarted(2000, "child", parent_run_key="p"), key="c")
    parent = batch(RunStarted(1000, "parent"), RunFinished("FINISHED", 3000), key="p", first=1)
    writer = MlflowWriter(store)
    writer.apply(group_by_run(child))  # the parent's partition lags behind
    (only,) = writer.client.search_runs(["1"])
    assert "mlflow.parentRunId" not in only.data.tags

    writer.apply(group_by_run(parent))
    runs = {r.info.run_name: r for r in writer.client.search_runs(["1"])}
    assert sorted(runs) == ["child", "parent"]  # no stand-in parent
    assert runs["parent"].info.start_time == 1000
    assert runs["child"].data.tags["mlflow.parentRunId"] == runs["parent"].info.run_id

    expected = expected_runs(group_by_run(child + parent))
    assert differences(expected, read_mlflow(writer.client, expected)) == {}


def test_after_a_rebalance_runs_are_read_again_not_trusted_from_the_cache(store: str) -> None:
    """Another member wrote an older tag value while this one did not own the partition."""
    from kafka_mlflow_sink.events import TagsSet

    mine, other = MlflowWriter(store), MlflowWriter(store)
    mine.apply(group_by_run(batch(RunStarted(1, "r"), TagsSet({"phase": "v1"}))))
    mine.apply(group_by_run(batch(TagsSet({"phase": "v2"}), first=2)))
    # The other member re-reads from an older commit and writes v1 again.
    other.apply(group_by_run(batch(TagsSet({"phase": "v1"}), first=1)))
    (run,) = mine.client.search_runs(["1"])
    assert run.data.tags["phase"] == "v1"

    mine.forget_runs()  # what the sink does when partitions are assigned
    mine.apply(group_by_run(batch(TagsSet({"phase": "v2"}), first=3)))
    (run,) = mine.client.search_runs(["1"])
    assert run.data.tags["phase"] == "v2"


def test_the_log_batch_body_is_what_mlflows_rest_store_sends() -> None:
    import json
    import math

    from mlflow.entities import Metric, Param, RunTag
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.utils.proto_json_utils import message_to_json

    from kafka_mlflow_sink.writer import log_batch_body

    values = (math.nan, math.inf, -math.inf, -0.0, 1e-300, 3.0, -2.5, 1e308)
    metrics = [
        Metric(f"m/{i}", v, 2**62 - i, step)
        for i, (v, step) in enumerate(zip(values, (0, -3, 2**40, 1, 2, 3, 4, 5), strict=True))
    ]
    cases = [
        (metrics, [Param("p", ""), Param("q", "ü" * 3)], [RunTag("t", 'x\\n"y"')]),
        (metrics[:1], [], []),
        ([], [Param("only", "params")], []),
        ([], [], [RunTag("only", "tags")]),
    ]
    for m, p, t in cases:
        mlflows = message_to_json(
            LogBatch(
                run_id="abc",
                metrics=[x.to_proto() for x in m],
                params=[x.to_proto() for x in p],
                tags=[x.to_proto() for x in t],
            )
        )
        # Compared as the bytes on the wire, so NaN and -0.0 count as well.
        ours = json.dumps(log_batch_body("abc", m, p, t), sort_keys=True)
        assert ours == json.dumps(json.loads(mlflows), sort_keys=True)


def test_a_run_named_only_by_its_name_tag_is_created_with_that_name(store: str) -> None:
    """The run key is the name of a run without one; a name tag is a name too."""
    from kafka_mlflow_sink.events import ParamsLogged

    writer = MlflowWriter(store)
    started = RunStarted(1, None, tags={"mlflow.runName": "named-by-tag"})
    report = writer.apply(group_by_run(batch(started, ParamsLogged({"a": "1"}), key="kc")))
    assert report.rejected == [] and report.runs_created == 1
    (run,) = writer.client.search_runs(["1"])
    assert run.info.run_name == "named-by-tag" and run.data.params == {"a": "1"}


def test_an_embedded_store_holds_what_mlflow_client_log_batch_would_have_written(
    store: str,
) -> None:
    """The sink writes straight into the store; MLflow's client must read back the same."""
    import math

    from mlflow.entities import Metric, Param, RunTag

    from kafka_mlflow_sink.events import ParamsLogged, TagsSet

    values = (math.nan, math.inf, -math.inf, -0.0, 1e-300, 3.0, -2.5, 1e308)
    points = tuple(MetricPoint("m", v, step, 10 + step) for step, v in enumerate(values))
    writer = MlflowWriter(store)
    assert not hasattr(writer._log_batch_call, "func")  # not the client's log_batch
    events = batch(
        RunStarted(1, "ours"), ParamsLogged({"p": "ü"}), TagsSet({"t": "x"}), MetricsLogged(points)
    )
    assert writer.apply(group_by_run(events)).points == len(values)

    client = writer.client
    (ours,) = client.search_runs(["1"])
    theirs = client.create_run("1").info.run_id
    client.log_batch(
        theirs,
        metrics=[Metric(p.key, p.value, p.timestamp, p.step) for p in points],
        params=[Param("p", "ü")],
        tags=[RunTag("t", "x")],
    )

    def held(run_id: str) -> tuple[list[tuple[object, ...]], dict[str, str], str]:
        history = [
            (m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value)
            for m in client.get_metric_history(run_id, "m")
        ]
        run = client.get_run(run_id)
        return sorted(history), run.data.params, run.data.tags["t"]

    assert held(ours.info.run_id) == held(theirs)
