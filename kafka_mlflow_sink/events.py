"""The event contract in Python: one class per thing a training job does to a run.

A ``RunEvent`` is the envelope (event id, run key, experiment, creation time) around exactly
one payload. ``to_record`` and ``from_record`` convert to and from the dicts fastavro reads
and writes for ``schemas/run_event.v1.avsc``; they are the only code that knows the schema's
field names.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from sys import intern
from typing import Any, NamedTuple

from kafka_mlflow_sink.errors import DecodeError

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Run keys go into Kafka keys and MLflow search filters: keep them plain.
RUN_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")
MAX_EXPERIMENT_NAME_LENGTH = 500


class MetricPoint(NamedTuple):
    """One metric value at one step; ``timestamp`` is epoch milliseconds."""

    key: str
    value: float
    step: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class RunStarted:
    start_time: int
    run_name: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    parent_run_key: str | None = None


@dataclass(frozen=True, slots=True)
class ParamsLogged:
    params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class MetricsLogged:
    points: tuple[MetricPoint, ...]


@dataclass(frozen=True, slots=True)
class TagsSet:
    tags: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ArtifactLogged:
    path: str
    content: bytes


@dataclass(frozen=True, slots=True)
class RunFinished:
    status: str
    end_time: int


Payload = RunStarted | ParamsLogged | MetricsLogged | TagsSet | ArtifactLogged | RunFinished

# Schema field name of each payload type, in schema order.
_PAYLOAD_FIELDS: dict[type[Any], str] = {
    RunStarted: "run_started",
    ParamsLogged: "params_logged",
    MetricsLogged: "metrics_logged",
    TagsSet: "tags_set",
    ArtifactLogged: "artifact_logged",
    RunFinished: "run_finished",
}


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One event of one run, as carried by one Kafka record."""

    run_key: str
    experiment_name: str
    payload: Payload
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: int = field(default_factory=lambda: now_ms())


def now_ms() -> int:
    """The current time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def to_record(event: RunEvent) -> dict[str, Any]:
    """The fastavro dict for ``event``."""
    record: dict[str, Any] = {
        "event_id": event.event_id,
        "run_key": event.run_key,
        "experiment_name": event.experiment_name,
        "created_at": event.created_at,
    }
    for name in _PAYLOAD_FIELDS.values():
        record[name] = None
    payload = event.payload
    body: dict[str, Any]
    if isinstance(payload, MetricsLogged):
        body = {"points": [p._asdict() for p in payload.points]}
    elif isinstance(payload, RunStarted | ParamsLogged | TagsSet | ArtifactLogged | RunFinished):
        fields = ((f.name, getattr(payload, f.name)) for f in dataclass_fields(payload))
        body = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in fields}
    else:
        raise TypeError(f"not a run event payload: {type(payload).__name__}")
    record[_PAYLOAD_FIELDS[type(payload)]] = body
    return record


def from_record(record: Mapping[str, Any]) -> RunEvent:
    """The ``RunEvent`` for a decoded fastavro dict.

    Raises:
        DecodeError: when no payload or more than one payload is set.
    """
    run_key, experiment = record["run_key"], record["experiment_name"]
    if not RUN_KEY_PATTERN.match(run_key):
        raise DecodeError(f"run key {run_key[:80]!r} is not 1-200 of [A-Za-z0-9_.:-]")
    if not experiment or len(experiment) > MAX_EXPERIMENT_NAME_LENGTH:
        raise DecodeError(f"experiment name must have 1-{MAX_EXPERIMENT_NAME_LENGTH} characters")
    present = [name for name in _PAYLOAD_FIELDS.values() if record.get(name) is not None]
    if len(present) != 1:
        what = "no payload" if not present else f"several payloads ({', '.join(present)})"
        raise DecodeError(f"run event {record.get('event_id')!r} has {what}; expected exactly one")
    return RunEvent(
        run_key=run_key,
        experiment_name=experiment,
        payload=_payload(present[0], record[present[0]]),
        event_id=record["event_id"],
        created_at=record["created_at"],
    )


def _payload(name: str, body: Mapping[str, Any]) -> Payload:
    if name == "metrics_logged":
        # A batch holds thousands of points under a handful of keys: share one string each.
        return MetricsLogged(
            tuple(
                MetricPoint(intern(p["key"]), p["value"], p["step"], p["timestamp"])
                for p in body["points"]
            )
        )
    if name == "run_started":
        return RunStarted(
            start_time=body["start_time"],
            run_name=body.get("run_name"),
            tags=body.get("tags") or {},
            parent_run_key=body.get("parent_run_key"),
        )
    if name == "params_logged":
        return ParamsLogged(body["params"])
    if name == "tags_set":
        return TagsSet(body["tags"])
    if name == "artifact_logged":
        return ArtifactLogged(body["path"], body["content"])
    return RunFinished(body["status"], body["end_time"])
