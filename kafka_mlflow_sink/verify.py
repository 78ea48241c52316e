"""Verify: does MLflow hold everything a topic says?

The topic is folded with the same write plan the sink uses, starting from an empty run, so
"what the topic says" means exactly what the sink would have written: the first value of a
param, the last value of a tag, the last "run finished", every metric point, the last bytes
written to each artifact path, and nothing from records the sink refuses. MLflow may hold more
(MLflow's own tags, say); only what is missing or different counts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import ViewType

from kafka_mlflow_sink.batch import position
from kafka_mlflow_sink.codec import Codec
from kafka_mlflow_sink.errors import DecodeError
from kafka_mlflow_sink.events import MetricPoint
from kafka_mlflow_sink.plan import (
    PARENT_RUN_TAG,
    RUN_KEY_TAG,
    START_UNKNOWN_TAG,
    PointId,
    Rejection,
    RunEvents,
    RunState,
    SourcedEvent,
    group_by_run,
    plan_run,
    point_id,
)
from kafka_mlflow_sink.reader import StartAt, TopicReader
from kafka_mlflow_sink.writer import creation_order, run_name


@dataclass
class RunContent:
    """What one run holds, in terms a topic and an MLflow can both be read into."""

    experiment: str
    run_name: str | None = None
    start_time: int | None = None  # None: the topic does not say when the run started
    end_time: int | None = None
    status: str = "RUNNING"
    parent_key: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    points: set[PointId] = field(default_factory=set)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    copies: int = 1  # MLflow runs carrying this run key; more than one is a duplicate
    stored_points: int = 0  # metric points MLflow returns, counting any stored twice


@dataclass
class TopicContent:
    runs: dict[str, RunContent]
    records: int
    undecodable: int
    refused: int = 0  # records MLflow would refuse: the sink dead-letters them


def read_topic(
    settings: Mapping[str, object], topics: tuple[str, ...], codec: Codec, batch_records: int = 5000
) -> TopicContent:
    """Every run a topic describes, as the sink would write it."""
    reader = TopicReader(settings, topics, StartAt())
    events: list[SourcedEvent] = []
    records = undecodable = 0
    try:
        for batch in reader.batches(batch_records, 0.5):
            for msg in batch:
                records += 1
                where = position(msg)
                try:
                    events.append(SourcedEvent(codec.decode(msg.value(), where.topic), where))
                except DecodeError:
                    undecodable += 1
    finally:
        reader.close()
    refused: list[Rejection] = []
    runs = expected_runs(group_by_run(events), refused)
    return TopicContent(runs, records, undecodable, len(refused))


def expected_runs(
    runs: Iterable[RunEvents], refused: list[Rejection] | None = None
) -> dict[str, RunContent]:
    """What MLflow should hold for each run, folded with the sink's own write plan.

    Records the plan refuses are not expected in MLflow; they are added to ``refused``.
    """
    expected: dict[str, RunContent] = {}
    for run in runs:
        writes = plan_run(run, RunState())
        if refused is not None:
            refused.extend(writes.rejected)
        state = writes.state
        start = run.start
        content = RunContent(
            experiment=run.experiment_name,
            run_name=run_name(run.run_key, start),
            start_time=start.start_time if start else None,
            end_time=state.end_time,
            status=state.status or "RUNNING",
            parent_key=start.parent_run_key if start else None,
            params=state.params,
            tags=state.tags,
            points=state.points,
        )
        for artifact, _position in writes.artifacts:  # refused ones are not expected
            content.artifacts[artifact.path] = artifact.content
        if start is None:
            content.tags[START_UNKNOWN_TAG] = "true"
        expected[run.run_key] = content
    return expected


def read_mlflow(client: MlflowClient, wanted: Mapping[str, RunContent]) -> dict[str, RunContent]:
    """What MLflow holds for the runs in ``wanted``, found by run key in their experiments."""
    found: dict[str, RunContent] = {}
    keys_by_id: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kafka-mlflow-sink-verify-") as tmp:
        for key, want in wanted.items():
            runs = _find(client, want.experiment, key)
            if not runs:
                continue
            for run in runs:
                keys_by_id[run.info.run_id] = key
            found[key] = _content(client, runs[0], want.experiment, want.artifacts, Path(tmp))
            found[key].copies = len(runs)
    for content in found.values():
        parent_id = content.tags.get(PARENT_RUN_TAG)
        if parent_id:
            content.parent_key = keys_by_id.get(parent_id, f"(run id {parent_id}, no run key)")
    return found


def _find(client: MlflowClient, experiment: str, key: str) -> list[Any]:
    """The active runs of a run key, the one the sink writes to first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`{RUN_KEY_TAG}` = '{key}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=10,
    )
    return sorted(runs, key=creation_order)


def _content(
    client: MlflowClient, run: Any, experiment: str, artifacts: Mapping[str, bytes], tmp: Path
) -> RunContent:
    info, data = run.info, run.data
    content = RunContent(
        experiment=experiment,
        run_name=info.run_name,
        start_time=info.start_time,
        end_time=info.end_time,
        status=info.status,
        params=dict(data.params),
        tags=dict(data.tags),
    )
    for key in data.metrics:
        history = client.get_metric_history(info.run_id, key)
        content.stored_points += len(history)
        content.points.update(
            point_id(MetricPoint(m.key, m.value, m.step, m.timestamp)) for m in history
        )
    for path in artifacts:
        try:
            local = client.download_artifacts(info.run_id, path, str(tmp / info.run_id))
        except Exception:  # missing artifact: reported as a difference
            continue
        content.artifacts[path] = Path(local).read_bytes()
    return content


def differences(
    expected: Mapping[str, RunContent], actual: Mapping[str, RunContent]
) -> dict[str, list[str]]:
    """Per run key, what MLflow lacks or holds differently; runs without problems are absent."""
    report: dict[str, list[str]] = {}
    for key, want in expected.items():
        got = actual.get(key)
        problems = ["missing run"] if got is None else _compare(want, got)
        if problems:
            report[key] = problems
    return report


def _compare(want: RunContent, got: RunContent) -> list[str]:
    problems: list[str] = []
    if got.copies > 1:
        problems.append(f"{got.copies} MLflow runs carry this run key; expected one")
    fields = [
        ("run name", want.run_name, got.run_name),
        ("status", want.status, got.status),
        ("end time", want.end_time, got.end_time),
        ("parent", want.parent_key, got.parent_key),
    ]
    if want.start_time is not None:
        fields.append(("start time", want.start_time, got.start_time))
    for name, expected, actual in fields:
        if expected is not None and expected != actual:
            problems.append(f"{name} is {actual!r}, topic says {expected!r}")
    problems += _compare_map("param", want.params, got.params)
    problems += _compare_map("tag", want.tags, got.tags)
    missing = want.points - got.points
    if missing:
        sample = ", ".join(f"{k}@step {s} ts {t}" for k, s, t, _ in sorted(missing, key=str)[:3])
        problems.append(f"{len(missing)} metric point(s) missing, e.g. {sample}")
    if got.stored_points > len(got.points):
        problems.append(f"{got.stored_points - len(got.points)} metric point(s) stored twice")
    for path, content in want.artifacts.items():
        if path not in got.artifacts:
            problems.append(f"artifact {path!r} missing")
        elif got.artifacts[path] != content:
            problems.append(
                f"artifact {path!r} differs ({len(got.artifacts[path])} bytes, "
                f"topic has {len(content)})"
            )
    return problems


def _compare_map(kind: str, want: Mapping[str, str], got: Mapping[str, str]) -> list[str]:
    problems = []
    for key, value in want.items():
        if key not in got:
            problems.append(f"{kind} {key!r} missing")
        elif got[key] != value:
            problems.append(f"{kind} {key!r} is {got[key][:60]!r}, topic says {value[:60]!r}")
    return problems


def describe(expected: Mapping[str, RunContent], report: Mapping[str, list[str]]) -> list[str]:
    """Lines for the user: one per differing run, then a summary."""
    lines = []
    for key, problems in report.items():
        name = expected[key].run_name or "(no name)"
        lines.append(f"run {key} {name!r} in {expected[key].experiment!r}: " + "; ".join(problems))
    lines.append(
        f"verified {len(expected)} runs: {len(expected) - len(report)} match, {len(report)} differ"
    )
    return lines
