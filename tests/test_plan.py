"""The write plan: folding per run, MLflow's limits, and skipping what MLflow already holds."""

from __future__ import annotations

import math

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
from kafka_mlflow_sink.plan import (
    MAX_BATCH_BYTES,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    MAX_TAGS_PER_BATCH,
    Position,
    RunEvents,
    RunState,
    SourcedEvent,
    check_key,
    group_by_run,
    plan_run,
)


def batch_of(
    *items: tuple[str, Payload], topic: str = "t", partition: int = 0
) -> list[SourcedEvent]:
    return [
        SourcedEvent(RunEvent(run_key, "exp", payload), Position(topic, partition, offset))
        for offset, (run_key, payload) in enumerate(items)
    ]


def one_run(*payloads: Payload) -> RunEvents:
    (run,) = group_by_run(batch_of(*(("r", p) for p in payloads)))
    return run


def points(n: int, key: str = "m", start: int = 0) -> MetricsLogged:
    return MetricsLogged(
        tuple(MetricPoint(key, float(i), i, 1000 + i) for i in range(start, start + n))
    )


def test_group_by_run_keeps_offset_order_within_each_run() -> None:
    events = batch_of(
        ("a", RunStarted(1)),
        ("b", RunStarted(2)),
        ("a", points(1)),
        ("b", points(2)),
        ("a", RunFinished("FINISHED", 9)),
    )
    runs = group_by_run(events)
    assert [r.run_key for r in runs] == ["a", "b"]
    assert [s.position.offset for s in runs[0].events] == [0, 2, 4]
    assert [s.position.offset for s in runs[1].events] == [1, 3]


def test_parents_started_in_the_batch_come_before_their_children() -> None:
    events = batch_of(
        ("child", RunStarted(2, parent_run_key="parent")),
        ("grandchild", RunStarted(3, parent_run_key="child")),
        ("parent", RunStarted(1)),
    )
    assert [r.run_key for r in group_by_run(events)] == ["parent", "child", "grandchild"]


def test_parent_cycles_do_not_loop_forever() -> None:
    events = batch_of(
        ("a", RunStarted(1, parent_run_key="b")), ("b", RunStarted(1, parent_run_key="a"))
    )
    assert sorted(r.run_key for r in group_by_run(events)) == ["a", "b"]


def test_every_log_batch_stays_within_mlflow_limits_and_nothing_is_dropped() -> None:
    params = ParamsLogged({f"p{i}": str(i) for i in range(150)})
    tags = TagsSet({f"t{i}": "v" for i in range(250)})
    writes = plan_run(one_run(params, points(2500), tags), RunState())
    for batch in writes.batches:
        assert len(batch.metrics) <= MAX_METRICS_PER_BATCH
        assert len(batch.params) <= MAX_PARAMS_PER_BATCH
        assert len(batch.tags) <= MAX_TAGS_PER_BATCH
        assert batch.entities <= MAX_ENTITIES_PER_BATCH
    assert sum(len(b.params) for b in writes.batches) == 150
    assert sum(len(b.metrics) for b in writes.batches) == 2500
    assert sum(len(b.tags) for b in writes.batches) == 250
    written = {(p.key, p.step) for b in writes.batches for p in b.metrics}
    assert written == {("m", i) for i in range(2500)}


def test_long_values_split_batches_below_mlflows_request_size() -> None:
    params = ParamsLogged({f"p{i}": "x" * 6000 for i in range(100)})
    tags = TagsSet({f"t{i}": "y" * 8000 for i in range(100)})
    writes = plan_run(one_run(params, tags), RunState())
    assert all(b.size <= MAX_BATCH_BYTES for b in writes.batches)
    assert sum(len(b.params) + len(b.tags) for b in writes.batches) == 200
    assert len(writes.batches) >= 2


def test_metric_points_keep_their_order_within_a_run() -> None:
    writes = plan_run(one_run(points(3, start=0), points(3, start=3)), RunState())
    steps = [p.step for b in writes.batches for p in b.metrics]
    assert steps == [0, 1, 2, 3, 4, 5]


def test_what_mlflow_already_holds_is_not_written_again() -> None:
    run = one_run(
        RunStarted(1, tags={"team": "a"}),
        ParamsLogged({"lr": "0.1"}),
        points(5),
        TagsSet({"stage": "x"}),
        RunFinished("FINISHED", 10),
    )
    first = plan_run(run, RunState())
    assert first.points == 5 and first.finish is not None
    again = plan_run(run, first.state)
    assert again.batches == []
    assert again.finish is None
    assert again.rejected == []


def test_identical_nan_and_infinite_points_count_as_written() -> None:
    special = MetricsLogged((MetricPoint("m", math.nan, 1, 5), MetricPoint("m", math.inf, 2, 5)))
    first = plan_run(one_run(special), RunState())
    assert first.points == 2
    assert plan_run(one_run(special), first.state).points == 0


def test_a_point_differing_only_in_timestamp_is_a_new_point() -> None:
    first = plan_run(one_run(MetricsLogged((MetricPoint("m", 1.0, 1, 5),))), RunState())
    other = plan_run(one_run(MetricsLogged((MetricPoint("m", 1.0, 1, 6),))), first.state)
    assert other.points == 1


def test_a_param_changing_value_rejects_only_its_record() -> None:
    run = one_run(
        ParamsLogged({"lr": "0.1"}),
        points(2),
        ParamsLogged({"lr": "0.2", "x": "1"}),
        points(1, start=2),
    )
    writes = plan_run(run, RunState())
    assert [r.position.offset for r in writes.rejected] == [2]
    assert "already logged as '0.1'" in writes.rejected[0].reason
    assert writes.points == 3
    assert [p for b in writes.batches for p in b.params] == [("lr", "0.1")]


def test_a_param_logged_again_with_the_same_value_is_fine() -> None:
    writes = plan_run(
        one_run(ParamsLogged({"lr": "0.1"}), ParamsLogged({"lr": "0.1"})),
        RunState(params={"lr": "0.1"}),
    )
    assert writes.rejected == [] and writes.batches == []


def test_keys_and_values_mlflow_refuses_are_rejected_with_a_reason() -> None:
    run = one_run(
        ParamsLogged({"bad*key": "1"}),
        ParamsLogged({"long": "v" * 6001}),
        TagsSet({"t": "v" * 8001}),
        MetricsLogged((MetricPoint("../escape", 1.0, 0, 1),)),
        ArtifactLogged("../outside.txt", b"x"),
        ParamsLogged({"ok": "1"}),
    )
    writes = plan_run(run, RunState())
    reasons = {r.position.offset: r.reason for r in writes.rejected}
    assert sorted(reasons) == [0, 1, 2, 3, 4]
    assert "characters MLflow refuses" in reasons[0]
    assert "6001 characters" in reasons[1] and "refused rather than truncated" in reasons[1]
    assert "8001 characters" in reasons[2]
    assert "normalized relative path" in reasons[3]
    assert [p for b in writes.batches for p in b.params] == [("ok", "1")]


def test_key_check_accepts_what_mlflow_accepts() -> None:
    for key in ("loss", "val/acc top-1", "a:b.c_d", "Größe", "x" * 250):
        assert check_key("metric", key) is None, key
    for key in ("", "x" * 251, "a//b", "/abs", "a/", "tab\tkey", "semi;colon"):
        assert check_key("metric", key) is not None, key


def test_a_tag_set_twice_ends_with_the_later_value() -> None:
    writes = plan_run(one_run(TagsSet({"stage": "a"}), TagsSet({"stage": "b"})), RunState())
    applied: dict[str, str] = {}
    for batch in writes.batches:
        applied.update(batch.tags)
    assert applied == {"stage": "b"}
    assert writes.state.tags["stage"] == "b"


def test_a_tag_set_many_times_is_written_once_with_its_last_value() -> None:
    # Writing each value in turn would leave an old one behind when writing stops half-way.
    run = one_run(*(TagsSet({"epoch": str(i)}) for i in range(300)), points(1))
    writes = plan_run(run, RunState())
    tags = [
        (tag, source)
        for b in writes.batches
        for tag, source in zip(b.tags, b.tag_sources, strict=True)
    ]
    assert tags == [(("epoch", "299"), Position("t", 0, 299))]
    assert writes.state.tags["epoch"] == "299"


def test_a_replay_over_a_run_mlflow_holds_writes_no_old_tag_value() -> None:
    run = one_run(*(TagsSet({"epoch": str(i)}) for i in range(300)))
    assert plan_run(run, RunState(tags={"epoch": "299"})).batches == []
    # Changed and changed back within the plan: nothing to write either.
    back = one_run(TagsSet({"stage": "b"}), TagsSet({"stage": "a"}))
    assert plan_run(back, RunState(tags={"stage": "a"})).batches == []


def test_the_sinks_own_tags_cannot_be_set_by_an_event() -> None:
    run = one_run(
        TagsSet({"kafka_mlflow_sink.run_key": "someone-else"}),
        RunStarted(1, "r", tags={"kafka_mlflow_sink.parent_run_key": "p"}),
        TagsSet({"ok": "1"}),
    )
    writes = plan_run(run, RunState())
    reasons = {r.position.offset: r.reason for r in writes.rejected}
    assert sorted(reasons) == [0, 1]
    assert "reserved for the sink's own bookkeeping" in reasons[0]
    assert run.start is None
    assert [t for b in writes.batches for t in b.tags] == [("ok", "1")]


def test_a_run_started_whose_name_and_name_tag_differ_is_refused_alone() -> None:
    run = one_run(RunStarted(1, "B", tags={"mlflow.runName": "other"}), ParamsLogged({"a": "1"}))
    assert run.start is None  # the run is still created, from the records MLflow accepts
    writes = plan_run(run, RunState())
    assert [r.position.offset for r in writes.rejected] == [0]
    assert "MLflow refuses to create such a run" in writes.rejected[0].reason
    assert [p for b in writes.batches for p in b.params] == [("a", "1")]
    same = one_run(RunStarted(1, "B", tags={"mlflow.runName": "B"}))
    assert same.start is not None


def test_the_last_run_finished_wins() -> None:
    writes = plan_run(one_run(RunFinished("FAILED", 5), RunFinished("FINISHED", 7)), RunState())
    assert writes.finish == RunFinished("FINISHED", 7)


def test_only_picks_the_entities_of_one_record() -> None:
    run = one_run(ParamsLogged({"a": "1"}), points(2), TagsSet({"t": "x"}))
    (batch,) = plan_run(run, RunState()).batches
    part = batch.only(Position("t", 0, 1))
    assert (len(part.metrics), part.params, part.tags) == (2, [], [])
    assert batch.positions == [Position("t", 0, i) for i in range(3)]


def test_planning_does_not_change_the_known_state() -> None:
    known = RunState(params={"a": "1"})
    plan_run(one_run(ParamsLogged({"b": "2"}), points(3)), known)
    assert known.params == {"a": "1"} and known.points == set()


def test_the_run_finished_record_is_known_by_its_position() -> None:
    writes = plan_run(one_run(points(1), RunFinished("FINISHED", 7)), RunState())
    assert writes.finish_position == Position("t", 0, 1)


def test_a_refused_run_started_is_not_the_runs_start() -> None:
    run = one_run(RunStarted(1, "bad", tags={"bad#tag": "v"}), points(1))
    assert run.start is None
    writes = plan_run(run, RunState())
    assert [r.position.offset for r in writes.rejected] == [0]
    assert "bad#tag" not in writes.state.tags


def test_artifact_paths_must_fit_a_file_system() -> None:
    run = one_run(
        ArtifactLogged("dir/" + "n" * 300 + ".txt", b"x"), ArtifactLogged("ok/f.txt", b"y")
    )
    writes = plan_run(run, RunState())
    assert [r.position.offset for r in writes.rejected] == [0]
    assert "over 255 bytes" in writes.rejected[0].reason
    assert [a.path for a, _ in writes.artifacts] == ["ok/f.txt"]
