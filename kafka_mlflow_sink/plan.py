"""The write plan: what one batch of run events asks of MLflow, as pure data.

Folding a batch takes two steps, both free of I/O:

1. ``group_by_run`` splits the decoded records of a batch by run key, keeping offset order
   inside each run, and orders runs so that a parent started in the batch comes before its
   children.
2. ``plan_run`` turns the events of one run, and what MLflow already holds for that run
   (``RunState``), into the writes still needed: ``log_batch`` chunks within MLflow's limits,
   artifacts, and the run's end. What MLflow already holds is skipped, so applying a record
   twice writes nothing the second time (the idempotence promise does not lean on the SQL
   store dropping identical rows). A record MLflow would refuse for good (a param that
   changes value, a key MLflow does not allow, a value over its length limit) becomes a
   ``Rejection`` and contributes nothing; the rest of the batch still goes through.
"""

from __future__ import annotations

import math
import posixpath
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from kafka_mlflow_sink.events import (
    ArtifactLogged,
    MetricPoint,
    MetricsLogged,
    ParamsLogged,
    RunEvent,
    RunFinished,
    RunStarted,
    TagsSet,
)

# MLflow 3 limits (mlflow/utils/validation.py).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
# MLflow refuses requests over 1 MB; leave room for JSON quoting and the request envelope.
MAX_BATCH_BYTES = 800_000
_METRIC_BYTES = 120
# Artifacts become files on the way; most file systems allow 255 bytes per name.
MAX_PATH_PART_BYTES = 255  # generous JSON size of one metric point without its key

# Tags the sink itself keeps on every run it writes.
RUN_KEY_TAG = "kafka_mlflow_sink.run_key"
START_UNKNOWN_TAG = "kafka_mlflow_sink.start_unknown"
# When the sink created the run (epoch ms, its clock): orders runs created twice at once.
CREATED_AT_TAG = "kafka_mlflow_sink.created_at"
PARENT_RUN_TAG = "mlflow.parentRunId"
# The parent's run key, kept on a child so the parent can find it when it is created later.
PARENT_KEY_TAG = "kafka_mlflow_sink.parent_run_key"
RUN_NAME_TAG = "mlflow.runName"
# Tags under this prefix are the sink's own bookkeeping (how a run is found again, how a
# child finds its parent); an event setting one could make the sink lose track of a run.
RESERVED_TAG_PREFIX = "kafka_mlflow_sink."

_KEY_PATTERN = re.compile(r"^[/\w.\- :]*$")
# SQL stores keep infinities as the largest finite doubles; compare points the same way.
_FLOAT_MAX = sys.float_info.max


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record sits in Kafka."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class SourcedEvent:
    """A decoded run event and the record it came from."""

    event: RunEvent
    position: Position


@dataclass
class RunEvents:
    """The events of one run in one batch, in offset order."""

    run_key: str
    experiment_name: str
    events: list[SourcedEvent] = field(default_factory=list)

    @cached_property
    def start(self) -> RunStarted | None:
        """The first "run started" event MLflow would accept, if the batch has one.

        A refused one is dead-lettered, so nothing of it (name, time, tags) may be written.
        Read only once ``events`` is complete (``group_by_run`` fills it first).
        """
        for sourced in self.events:
            payload = sourced.event.payload
            if isinstance(payload, RunStarted) and _check(payload, RunState()) is None:
                return payload
        return None

    @property
    def first_created_at(self) -> int:
        return min(s.event.created_at for s in self.events)


PointId = tuple[str, int, int, float | str]


@dataclass
class RunState:
    """What MLflow holds for one run, as far as the sink knows."""

    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    points: set[PointId] = field(default_factory=set)
    status: str | None = None
    end_time: int | None = None

    def copy(self) -> RunState:
        return RunState(
            dict(self.params), dict(self.tags), set(self.points), self.status, self.end_time
        )


@dataclass(frozen=True)
class Rejection:
    """A record that MLflow would refuse for good, and why."""

    position: Position
    reason: str


Entry = tuple[str, str]


@dataclass
class LogBatch:
    """One ``log_batch`` call within every MLflow limit, and the record behind each entity.

    ``metric_sources[i]`` is the record that asked for ``metrics[i]``; likewise for params
    and tags. That is what lets the writer find the one record MLflow refuses in a call.
    """

    metrics: list[MetricPoint] = field(default_factory=list)
    params: list[Entry] = field(default_factory=list)
    tags: list[Entry] = field(default_factory=list)
    metric_sources: list[Position] = field(default_factory=list)
    param_sources: list[Position] = field(default_factory=list)
    tag_sources: list[Position] = field(default_factory=list)
    size: int = 0

    @property
    def entities(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    @property
    def positions(self) -> list[Position]:
        """The records this call serves, each once, in offset order."""
        every = {*self.metric_sources, *self.param_sources, *self.tag_sources}
        return sorted(every, key=lambda p: (p.topic, p.partition, p.offset))

    def only(self, position: Position) -> LogBatch:
        """The part of this call that serves the record at ``position``."""

        def pick(items: list[Any], sources: list[Position]) -> list[Any]:
            return [item for item, src in zip(items, sources, strict=True) if src == position]

        metrics = pick(self.metrics, self.metric_sources)
        params = pick(self.params, self.param_sources)
        tags = pick(self.tags, self.tag_sources)
        return LogBatch(
            metrics,
            params,
            tags,
            [position] * len(metrics),
            [position] * len(params),
            [position] * len(tags),
        )


@dataclass
class RunWrites:
    """Everything still to write for one run, in the order to write it."""

    batches: list[LogBatch] = field(default_factory=list)
    artifacts: list[tuple[ArtifactLogged, Position]] = field(default_factory=list)
    finish: RunFinished | None = None
    finish_position: Position | None = None
    rejected: list[Rejection] = field(default_factory=list)
    state: RunState = field(default_factory=RunState)

    @property
    def points(self) -> int:
        return sum(len(b.metrics) for b in self.batches)


def point_id(point: MetricPoint) -> PointId:
    """What makes a metric point the same point in MLflow, NaN and infinities included."""
    value: float | str = point.value
    if math.isnan(point.value):
        value = "nan"
    elif math.isinf(point.value):
        value = _FLOAT_MAX if point.value > 0 else -_FLOAT_MAX
    return (point.key, point.step, point.timestamp, value)


def group_by_run(events: Iterable[SourcedEvent]) -> list[RunEvents]:
    """Split a batch by run, offset order kept inside each run, parents before children."""
    runs: dict[str, RunEvents] = {}
    for sourced in events:
        key = sourced.event.run_key
        if key not in runs:
            runs[key] = RunEvents(key, sourced.event.experiment_name)
        runs[key].events.append(sourced)
    ordered: list[RunEvents] = []
    placed: set[str] = set()

    def place(run: RunEvents, path: frozenset[str]) -> None:
        if run.run_key in placed:
            return
        start = run.start
        parent = start.parent_run_key if start else None
        if parent in runs and parent not in path:
            place(runs[parent], path | {run.run_key})
        placed.add(run.run_key)
        ordered.append(run)

    for run in runs.values():
        place(run, frozenset())
    return ordered


def plan_run(run: RunEvents, known: RunState) -> RunWrites:
    """The writes that bring MLflow from ``known`` to what ``run``'s events say.

    ``known`` is not changed; the returned ``state`` is what MLflow holds once every write
    of the plan has been applied.
    """
    writes = RunWrites(state=known.copy())
    packer = _BatchPacker(writes.batches)
    for sourced in run.events:
        payload, position = sourced.event.payload, sourced.position
        problem = _check(payload, writes.state)
        if problem:
            writes.rejected.append(Rejection(position, problem))
            continue
        _fold(payload, position, writes, packer)
    # A tag changed and changed back within the plan needs no write at all.
    packer.drop_unchanged_tags(known.tags)
    return writes


def _fold(payload: object, position: Position, writes: RunWrites, packer: _BatchPacker) -> None:
    state = writes.state
    if isinstance(payload, MetricsLogged):
        for point in payload.points:
            pid = point_id(point)
            if pid not in state.points:
                state.points.add(pid)
                packer.add_metric(point, position)
    elif isinstance(payload, ParamsLogged):
        for key, value in payload.params.items():
            if key not in state.params:
                state.params[key] = value
                packer.add_param(key, value, position)
    elif isinstance(payload, TagsSet | RunStarted):
        for key, value in payload.tags.items():
            if state.tags.get(key) != value:
                state.tags[key] = value
                packer.add_tag(key, value, position)
    elif isinstance(payload, ArtifactLogged):
        writes.artifacts.append((payload, position))
    elif isinstance(payload, RunFinished) and (state.status, state.end_time) != (
        payload.status,
        payload.end_time,
    ):
        writes.finish, writes.finish_position = payload, position
        state.status, state.end_time = payload.status, payload.end_time


def _check(payload: object, state: RunState) -> str | None:
    """Why MLflow would refuse ``payload`` for good, or None when it would accept it."""
    if isinstance(payload, MetricsLogged):
        for point in payload.points:
            problem = check_key("metric", point.key)
            if problem:
                return problem
            if point.timestamp < 0:
                return f"metric {point.key!r} has a negative timestamp {point.timestamp}"
    elif isinstance(payload, ParamsLogged):
        return _check_params(payload.params, state)
    elif isinstance(payload, TagsSet | RunStarted):
        for key, value in payload.tags.items():
            problem = check_tag(key, value)
            if problem:
                return problem
        if isinstance(payload, RunStarted):
            return check_run_name(payload.run_name, payload.tags)
    elif isinstance(payload, ArtifactLogged):
        return check_artifact_path(payload.path)
    return None


def _check_params(params: Mapping[str, str], state: RunState) -> str | None:
    for key, value in params.items():
        problem = check_key("param", key) or _check_length(
            "param", key, value, MAX_PARAM_VALUE_LENGTH
        )
        if problem:
            return problem
        logged = state.params.get(key)
        if logged is not None and logged != value:
            return (
                f"param {key!r} is already logged as {_preview(logged)}; MLflow params are "
                f"immutable, refusing {_preview(value)}"
            )
    return None


def check_key(kind: str, key: str) -> str | None:
    """Why MLflow refuses ``key`` as a metric, param or tag name, or None."""
    if not key:
        return f"{kind} key is empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"{kind} key {_preview(key)} is longer than MLflow's {MAX_KEY_LENGTH} characters"
    if not _KEY_PATTERN.match(key):
        return (
            f"{kind} key {_preview(key)} has characters MLflow refuses (allowed: letters, "
            f"digits, '_', '-', '.', ' ', ':', '/')"
        )
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith(("..", "/")):
        return f"{kind} key {_preview(key)} is not a normalized relative path (MLflow refuses it)"
    return None


def check_tag(key: str, value: str) -> str | None:
    """Why a tag cannot be set from an event, or None."""
    if key.startswith(RESERVED_TAG_PREFIX):
        return f"tag {_preview(key)} is reserved for the sink's own bookkeeping"
    return check_key("tag", key) or _check_length("tag", key, value, MAX_TAG_VALUE_LENGTH)


def check_run_name(run_name: str | None, tags: Mapping[str, str]) -> str | None:
    """Why MLflow would refuse to create a run with this name and these tags, or None."""
    tagged = tags.get(RUN_NAME_TAG)
    if run_name and tagged is not None and tagged != run_name:
        return (
            f"run name {_preview(run_name)} and tag {RUN_NAME_TAG} {_preview(tagged)} differ; "
            "MLflow refuses to create such a run"
        )
    return None


def _check_length(kind: str, key: str, value: str, limit: int) -> str | None:
    if len(value) > limit:
        return (
            f"{kind} {key!r} has a value of {len(value)} characters, over MLflow's limit of "
            f"{limit}; refused rather than truncated"
        )
    return None


def check_artifact_path(path: str) -> str | None:
    """Why ``path`` cannot be an artifact path, or None."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return f"artifact path {path!r} must be relative, without '.', '..' or empty parts"
    if any(len(p.encode()) > MAX_PATH_PART_BYTES for p in parts):
        return f"artifact path {_preview(path)} has a part over {MAX_PATH_PART_BYTES} bytes"
    if "\x00" in path:
        return f"artifact path {_preview(path)} contains a NUL character"
    return None


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class _BatchPacker:
    """Appends entities to the last ``LogBatch``, starting a new one at any MLflow limit."""

    def __init__(self, batches: list[LogBatch]) -> None:
        self._batches = batches
        self._tag_batch: dict[str, LogBatch] = {}  # the batch holding each pending tag

    def add_metric(self, point: MetricPoint, source: Position) -> None:
        batch = self._room(
            len(point.key) + _METRIC_BYTES, lambda b: len(b.metrics) < MAX_METRICS_PER_BATCH
        )
        batch.metrics.append(point)
        batch.metric_sources.append(source)

    def add_param(self, key: str, value: str, source: Position) -> None:
        batch = self._room(_text_bytes(key, value), lambda b: len(b.params) < MAX_PARAMS_PER_BATCH)
        batch.params.append((key, value))
        batch.param_sources.append(source)

    def add_tag(self, key: str, value: str, source: Position) -> None:
        # A tag set again within one plan keeps only its last value: writing each value in
        # turn would leave an old one in MLflow when writing stops half-way (a replay stopped,
        # a crash), and a replay over a run MLflow already holds would roll it back meanwhile.
        held = self._tag_batch.get(key)
        if held is not None:
            i = next(i for i, (pending, _) in enumerate(held.tags) if pending == key)
            del held.tags[i], held.tag_sources[i]
        batch = self._room(_text_bytes(key, value), lambda b: len(b.tags) < MAX_TAGS_PER_BATCH)
        batch.tags.append((key, value))
        batch.tag_sources.append(source)
        self._tag_batch[key] = batch

    def drop_unchanged_tags(self, held: Mapping[str, str]) -> None:
        """Drop the pending tags whose value MLflow already ``held`` before the plan."""
        for batch in self._batches:
            keep = [i for i, (key, value) in enumerate(batch.tags) if held.get(key) != value]
            batch.tags = [batch.tags[i] for i in keep]
            batch.tag_sources = [batch.tag_sources[i] for i in keep]
        self._batches[:] = [b for b in self._batches if b.entities]

    def _room(self, size: int, fits: Callable[[LogBatch], bool]) -> LogBatch:
        batch = self._batches[-1] if self._batches else None
        if (
            batch is None
            or not fits(batch)
            or batch.entities >= MAX_ENTITIES_PER_BATCH
            or batch.size + size > MAX_BATCH_BYTES
        ):
            batch = LogBatch()
            self._batches.append(batch)
        batch.size += size
        return batch


def _text_bytes(key: str, value: str) -> int:
    return len(key.encode()) + len(value.encode()) + 40
