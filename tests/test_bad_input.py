"""Bad records among good ones, through the real sink into a real MLflow.

Every bad record goes to the dead-letter topic on its own, with its key, value and headers
and the origin headers a Kafka Connect user knows; its neighbours land in MLflow; the tally
accounts for every record.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from mlflow import MlflowClient

from kafka_mlflow_sink.codec import BareCodec, RegistryCodec, schema_text
from kafka_mlflow_sink.config import SinkConfig
from kafka_mlflow_sink.deadletter import HEADER_PREFIX
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
    to_record,
)
from kafka_mlflow_sink.plan import MAX_PARAM_VALUE_LENGTH
from kafka_mlflow_sink.sink import Sink
from kafka_mlflow_sink.writer import MlflowWriter
from tests.support import (
    SinkProcess,
    assert_nothing_lost_or_duplicated,
    cli,
    consume_all,
    sink_args,
    tally,
    wait_for_zero_lag,
    wait_until,
)

pytestmark = pytest.mark.integration


def dead_letters(bootstrap: str, topic: str) -> dict[int, tuple[Any, dict[str, str]]]:
    """The dead letters of ``topic`` by origin offset: the record and its headers."""
    letters = {}
    for letter in consume_all(bootstrap, f"{topic}.dlq"):
        headers = {k: (v or b"").decode() for k, v in letter.headers() or []}
        letters[int(headers[HEADER_PREFIX + "offset"])] = (letter, headers)
    return letters


def test_each_bad_record_is_dead_lettered_and_its_neighbours_land(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic()
    codec = BareCodec()
    key = f"bad-{uuid.uuid4().hex[:8]}"

    def event(payload: Payload) -> bytes:
        return codec.encode(RunEvent(key, "bad-input", payload), events)

    metrics = event(MetricsLogged((MetricPoint("loss", 0.5, 1, 1001),)))
    framed = RegistryCodec(f"mock://{uuid.uuid4().hex}").encode(
        RunEvent(key, "bad-input", TagsSet({"framed": "yes"})), events
    )
    records: list[tuple[bytes | None, str | None]] = [  # value, the reason when it is bad
        (event(RunStarted(1000, "bad-input-neighbours")), None),
        (event(ParamsLogged({"lr": "0.1"})), None),
        (b"\x07 this is not Avro", "not a bare Avro run event"),
        (metrics[:-3], "not a bare Avro run event"),
        (metrics + b"\xff\xfe", "followed by 2 unexpected bytes"),
        (framed, "DecodeError"),
        (None, "tombstone"),
        (event(ParamsLogged({"lr": "0.2"})), "param 'lr' is already logged as '0.1'"),
        (event(MetricsLogged((MetricPoint("loss@peak", 1.0, 0, 1002),))), "characters MLflow"),
        (event(ParamsLogged({"notes": "n" * (MAX_PARAM_VALUE_LENGTH + 1)})), "rather than trunc"),
        (event(ArtifactLogged("../escape.txt", b"x")), "artifact path '../escape.txt'"),
        (metrics, None),
        (event(TagsSet({"team": "vision"})), None),
        (event(ArtifactLogged("notes/readme.txt", b"kept")), None),
        (event(RunFinished("FINISHED", 2000)), None),
    ]
    producer = Producer({"bootstrap.servers": kafka_bootstrap_servers})
    for offset, (value, _) in enumerate(records):
        producer.produce(events, key=key, value=value, headers=[("trace", f"t-{offset}".encode())])
    assert producer.flush(10) == 0

    sink = start_sink(*sink_args(kafka_bootstrap_servers, events, "bad", mlflow_tracking_uri))
    wait_for_zero_lag(kafka_bootstrap_servers, events, "bad", sink)

    letters = dead_letters(kafka_bootstrap_servers, events)
    bad = {offset: reason for offset, (_, reason) in enumerate(records) if reason}
    assert sorted(letters) == sorted(bad)
    for offset, reason in bad.items():
        letter, headers = letters[offset]
        assert letter.key() == key.encode() and letter.value() == records[offset][0]
        assert headers["trace"] == f"t-{offset}"
        assert headers[HEADER_PREFIX + "topic"] == events
        assert headers[HEADER_PREFIX + "partition"] == "0"
        assert headers[HEADER_PREFIX + "connector.name"] == "bad"
        assert headers[HEADER_PREFIX + "timestamp"].isdigit()
        said = headers[HEADER_PREFIX + "exception.class.name"]
        said += " " + headers[HEADER_PREFIX + "exception.message"]
        assert reason in said, (offset, said)
        assert "\n" not in said

    run = MlflowClient(mlflow_tracking_uri).search_runs(
        [MlflowClient(mlflow_tracking_uri).get_experiment_by_name("bad-input").experiment_id],
        f"tags.`kafka_mlflow_sink.run_key` = '{key}'",
    )[0]
    assert run.data.params == {"lr": "0.1"} and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "vision" and "framed" not in run.data.tags
    assert run.data.metrics == {"loss": 0.5}
    verified = cli(
        "verify", "-b", kafka_bootstrap_servers, "-t", events, "--tracking-uri", mlflow_tracking_uri
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "verified 1 runs: 1 match, 0 differ" in verified.stdout
    assert "5 of 15 records could not be decoded" in verified.stdout
    assert "4 of 15 records hold what MLflow refuses" in verified.stdout
    result = tally(
        "bad bytes and values MLflow refuses", kafka_bootstrap_servers, events, mlflow_tracking_uri
    )
    assert_nothing_lost_or_duplicated(result, dead_lettered=len(bad))


def test_an_event_for_a_run_deleted_in_mlflow_is_dead_lettered_not_resurrected(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic()
    codec = BareCodec()
    key = f"deleted-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap_servers})

    def send(payload: Payload) -> None:
        value = codec.encode(RunEvent(key, "deleted-runs", payload), events)
        producer.produce(events, key=key, value=value)
        assert producer.flush(10) == 0

    send(RunStarted(1000, "to-be-deleted"))
    sink = start_sink(*sink_args(kafka_bootstrap_servers, events, "deleted", mlflow_tracking_uri))
    wait_for_zero_lag(kafka_bootstrap_servers, events, "deleted", sink)
    client = MlflowClient(mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("deleted-runs").experiment_id
    (run,) = client.search_runs([experiment], f"tags.`kafka_mlflow_sink.run_key` = '{key}'")
    client.delete_run(run.info.run_id)

    send(MetricsLogged((MetricPoint("loss", 0.1, 0, 1001),)))
    send(RunFinished("FINISHED", 2000))
    wait_for_zero_lag(kafka_bootstrap_servers, events, "deleted", sink)
    letters = dead_letters(kafka_bootstrap_servers, events)
    assert sorted(letters) == [1, 2]
    for _, headers in letters.values():
        # Refused by the sink (a run it looks up) or by MLflow (a run it had cached).
        assert "deleted" in headers[HEADER_PREFIX + "exception.message"], headers
    assert client.search_runs([experiment], "") == []  # nothing created in its place
    assert client.get_run(run.info.run_id).info.lifecycle_stage == "deleted"


def _schema(change: Callable[[dict[str, Any]], None]) -> str:
    schema = json.loads(schema_text())
    change(schema)
    return json.dumps(schema)


def _payload_fields(schema: dict[str, Any], name: str) -> list[dict[str, Any]]:
    (entry,) = [f for f in schema["fields"] if f["name"] == name]
    fields: list[dict[str, Any]] = next(t for t in entry["type"] if isinstance(t, dict))["fields"]
    return fields


def test_registry_framing_reads_evolved_schemas_and_dead_letters_bad_frames(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
) -> None:
    """The sink in this process, so that it shares the test's in-memory Schema Registry."""
    events = topic()
    registry = SchemaRegistryClient.new_client({"url": f"mock://{uuid.uuid4().hex}"})
    codec = RegistryCodec(client=registry)
    key = f"evolved-{uuid.uuid4().hex[:8]}"
    ctx = SerializationContext(events, MessageField.VALUE)

    def newer(schema: dict[str, Any]) -> None:  # adds an optional field, in a payload too
        schema["fields"].append({"name": "host", "type": ["null", "string"], "default": None})
        _payload_fields(schema, "run_started").append(
            {"name": "git_sha", "type": "string", "default": ""}
        )

    def older(schema: dict[str, Any]) -> None:  # before parent_run_key existed
        started = _payload_fields(schema, "run_started")
        started[:] = [f for f in started if f["name"] != "parent_run_key"]

    def removed(schema: dict[str, Any]) -> None:  # drops a payload field that has a default
        schema["fields"] = [f for f in schema["fields"] if f["name"] != "tags_set"]

    def written_with(change: Callable[[dict[str, Any]], None], payload: Payload) -> bytes:
        record = to_record(RunEvent(key, "evolved", payload))
        if change is newer:
            record["host"] = "gpu-7"
            if record.get("run_started"):
                record["run_started"]["git_sha"] = "abc123"
        if change is older and record.get("run_started"):
            del record["run_started"]["parent_run_key"]
        if change is removed:
            del record["tags_set"]
        serializer = AvroSerializer(registry, _schema(change), conf={"auto.register.schemas": True})
        return bytes(serializer(record, ctx) or b"")

    good = codec.encode(RunEvent(key, "evolved", ParamsLogged({"lr": "0.1"})), events)
    bare = BareCodec().encode(RunEvent(key, "evolved", TagsSet({"bare": "yes"})), events)
    records: list[tuple[bytes, str | None]] = [
        (written_with(older, RunStarted(1000, "from-an-older-producer")), None),
        (good, None),
        (written_with(newer, MetricsLogged((MetricPoint("loss", 0.5, 1, 1001),))), None),
        (bare, "first byte is not 0x00"),
        (b"\x00" + (987654).to_bytes(4, "big") + good[5:], "schema id 987654 is unknown"),
        (good + b"!!", "followed by 2 unexpected bytes"),
        (written_with(removed, RunFinished("FINISHED", 2000)), None),
    ]
    producer = Producer({"bootstrap.servers": kafka_bootstrap_servers})
    for value, _ in records:
        producer.produce(events, key=key, value=value)
    assert producer.flush(10) == 0

    config = SinkConfig(
        kafka_bootstrap_servers,
        (events,),
        group_id="registry",
        tracking_uri=mlflow_tracking_uri,
        framing="registry",
        schema_registry_url="mock://shared",
        batch_max_wait=0.2,
    )
    sink = Sink(config, codec, MlflowWriter(mlflow_tracking_uri))
    runner = threading.Thread(target=sink.run)
    runner.start()
    try:
        wait_until(lambda: sink.stats.records == len(records), 90, "every record handled")
    finally:
        sink.stop()
        runner.join(30)

    letters = dead_letters(kafka_bootstrap_servers, events)
    bad = {offset: reason for offset, (_, reason) in enumerate(records) if reason}
    assert sorted(letters) == sorted(bad)
    for offset, reason in bad.items():
        assert reason in letters[offset][1][HEADER_PREFIX + "exception.message"]
    result = tally(
        "registry framing: evolved schemas, bad frames",
        kafka_bootstrap_servers,
        events,
        mlflow_tracking_uri,
        codec=codec,
    )
    assert_nothing_lost_or_duplicated(result, dead_lettered=len(bad))
    client = MlflowClient(mlflow_tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("evolved").experiment_id],
        f"tags.`kafka_mlflow_sink.run_key` = '{key}'",
    )
    assert run.info.run_name == "from-an-older-producer" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1"} and run.data.metrics == {"loss": 0.5}
