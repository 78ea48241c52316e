"""Round trips of every event type through both framings, and the errors of bad bytes."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka.serialization import MessageField, SerializationContext

from kafka_mlflow_sink.codec import BareCodec, Codec, RegistryCodec, make_codec, schema_text
from kafka_mlflow_sink.errors import ConfigError, DecodeError, RegistryUnavailable
from kafka_mlflow_sink.events import (
    ArtifactLogged,
    MetricPoint,
    MetricsLogged,
    ParamsLogged,
    RunEvent,
    RunFinished,
    RunStarted,
    TagsSet,
    to_record,
)

TOPIC = "events"

PAYLOADS = {
    "run_started": RunStarted(
        1_700_000_000_000, "rün ☃", {"team": "vision", "ключ": "значение"}, "parent-1"
    ),
    "run_started_minimal": RunStarted(1_700_000_000_000),
    "run_started_empty_tags": RunStarted(5, None, {}, None),
    "params": ParamsLogged({"lr": "0.01", "größe": "große Zahl ✓", "empty": ""}),
    "params_empty": ParamsLogged({}),
    "metrics": MetricsLogged(
        (
            MetricPoint("loss", 0.25, 3, 1_700_000_000_123),
            MetricPoint("acc/top1", -0.0, -1, 0),
            MetricPoint("naïve", 1e308, 2**62, 2**53),
        )
    ),
    "metrics_empty": MetricsLogged(()),
    "tags": TagsSet({"note": "日本語のタグ", "": "empty key survives transport"}),
    "artifact": ArtifactLogged("plots/confusion.txt", bytes(range(256))),
    "artifact_empty": ArtifactLogged("empty.bin", b""),
    "finished": RunFinished("FINISHED", 1_700_000_100_000),
    "failed": RunFinished("FAILED", 1),
    "killed": RunFinished("KILLED", 2),
}


@pytest.fixture(params=["bare", "registry"])
def codec(request: pytest.FixtureRequest) -> Codec:
    if request.param == "bare":
        return BareCodec()
    return RegistryCodec(f"mock://{uuid.uuid4().hex}")


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_every_event_type_survives_a_round_trip(codec: Codec, name: str) -> None:
    event = RunEvent("run-1", "expériences ✓", PAYLOADS[name])
    assert codec.decode(codec.encode(event, TOPIC), TOPIC) == event


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_values_survive_a_round_trip(codec: Codec, value: float) -> None:
    event = RunEvent("run-1", "exp", MetricsLogged((MetricPoint("m", value, 1, 2),)))
    decoded = codec.decode(codec.encode(event, TOPIC), TOPIC)
    assert isinstance(decoded.payload, MetricsLogged)
    got = decoded.payload.points[0].value
    assert (math.isnan(got) and math.isnan(value)) or got == value


def test_registry_frame_starts_with_magic_byte_and_schema_id() -> None:
    codec = RegistryCodec(f"mock://{uuid.uuid4().hex}")
    data = codec.encode(RunEvent("r", "e", PAYLOADS["finished"]), TOPIC)
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") >= 1


def test_bare_bytes_carry_no_frame() -> None:
    event = RunEvent("r", "e", PAYLOADS["finished"])
    assert RegistryCodec(f"mock://{uuid.uuid4().hex}").encode(event, TOPIC)[5:] == (
        BareCodec().encode(event, TOPIC)
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "tombstone"),
        (b"", "not a bare Avro run event"),
        (b"\xff\xfe\xfd garbage that is not avro", "not a bare Avro run event"),
    ],
)
def test_bare_codec_names_why_bytes_are_not_an_event(data: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        BareCodec().decode(data, TOPIC)


def test_bare_codec_refuses_truncated_and_padded_records() -> None:
    good = BareCodec().encode(RunEvent("r", "e", PAYLOADS["metrics"]), TOPIC)
    with pytest.raises(DecodeError, match="ends before the event does") as truncated:
        BareCodec().decode(good[:-3], TOPIC)
    assert "Expected" not in str(truncated.value)  # fastavro's wording, meaningless to a user
    with pytest.raises(DecodeError, match="3 unexpected bytes"):
        BareCodec().decode(good + b"abc", TOPIC)


def test_registry_codec_refuses_bare_records_and_unknown_schema_ids() -> None:
    codec = RegistryCodec(f"mock://{uuid.uuid4().hex}")
    bare = BareCodec().encode(RunEvent("r", "e", PAYLOADS["params"]), TOPIC)
    with pytest.raises(DecodeError):
        codec.decode(bare, TOPIC)
    unknown_id = b"\x00" + (424242).to_bytes(4, "big") + bare
    with pytest.raises(DecodeError, match="schema id 424242 is unknown to the Schema Registry"):
        codec.decode(unknown_id, TOPIC)
    with pytest.raises(DecodeError, match="has no schema id"):
        codec.decode(b"\x00\x00\x01", TOPIC)


def test_registry_codec_refuses_truncated_and_padded_frames() -> None:
    codec = RegistryCodec(f"mock://{uuid.uuid4().hex}")
    framed = codec.encode(RunEvent("r", "e", PAYLOADS["metrics"]), TOPIC)
    assert codec.decode(framed, TOPIC).run_key == "r"
    with pytest.raises(DecodeError, match="not a registry-framed run event"):
        codec.decode(framed[:-3], TOPIC)
    with pytest.raises(DecodeError, match="followed by 4 unexpected bytes"):
        codec.decode(framed + b"junk", TOPIC)


def test_an_unreachable_registry_is_a_wait_not_a_bad_record() -> None:
    codec = RegistryCodec("http://127.0.0.1:1")
    with pytest.raises(RegistryUnavailable, match="Schema Registry unreachable") as caught:
        codec.decode(b"\x00\x00\x00\x00\x07" + b"\x02", TOPIC)
    assert caught.value.retriable


def test_bare_codec_refuses_registry_frames() -> None:
    framed = RegistryCodec(f"mock://{uuid.uuid4().hex}").encode(
        RunEvent("r", "e", PAYLOADS["metrics"]), TOPIC
    )
    with pytest.raises(DecodeError):
        BareCodec().decode(framed, TOPIC)


def test_an_event_with_two_payloads_is_refused() -> None:
    from kafka_mlflow_sink.events import to_record

    record = to_record(RunEvent("r", "e", PAYLOADS["finished"]))
    record["tags_set"] = {"tags": {"a": "b"}}
    import io

    import fastavro

    from kafka_mlflow_sink.codec import parsed_schema

    out = io.BytesIO()
    fastavro.schemaless_writer(out, parsed_schema(), record)
    with pytest.raises(DecodeError, match="several payloads"):
        BareCodec().decode(out.getvalue(), TOPIC)


def test_unknown_framing_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown framing"):
        make_codec("json")
    with pytest.raises(ConfigError, match="Schema Registry URL"):
        make_codec("registry")


def _evolved(change: Callable[[dict[str, Any]], None]) -> str:
    schema = json.loads(schema_text())
    change(schema)
    return json.dumps(schema)


def _payload_record(schema: dict[str, Any], field: str) -> dict[str, Any]:
    (entry,) = [f for f in schema["fields"] if f["name"] == field]
    return next(t for t in entry["type"] if isinstance(t, dict))


def _write_with(writer_schema: str, record: dict[str, Any]) -> tuple[RegistryCodec, bytes]:
    """Encode ``record`` as a producer with ``writer_schema`` would, into a shared registry."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer

    client = SchemaRegistryClient.new_client({"url": f"mock://{uuid.uuid4().hex}"})
    serializer = AvroSerializer(client, writer_schema, conf={"auto.register.schemas": True})
    data = serializer(record, SerializationContext(TOPIC, MessageField.VALUE))
    return RegistryCodec(client=client), bytes(data)


def test_a_newer_producers_added_optional_field_is_ignored() -> None:
    def add(schema: dict[str, Any]) -> None:
        schema["fields"].append({"name": "host", "type": ["null", "string"], "default": None})
        started = _payload_record(schema, "run_started")
        started["fields"].append({"name": "git_sha", "type": "string", "default": ""})

    record = to_record(RunEvent("r", "e", RunStarted(5, "named", {"a": "b"})))
    record["host"] = "gpu-7"
    record["run_started"]["git_sha"] = "abc123"
    codec, data = _write_with(_evolved(add), record)
    decoded = codec.decode(data, TOPIC)
    assert decoded.payload == RunStarted(5, "named", {"a": "b"})


def test_an_older_producer_without_a_defaulted_field_still_decodes() -> None:
    def remove(schema: dict[str, Any]) -> None:
        started = _payload_record(schema, "run_started")
        started["fields"] = [f for f in started["fields"] if f["name"] != "parent_run_key"]

    record = to_record(RunEvent("r", "e", RunStarted(5, "old")))
    del record["run_started"]["parent_run_key"]
    codec, data = _write_with(_evolved(remove), record)
    assert codec.decode(data, TOPIC).payload == RunStarted(5, "old", {}, None)


def test_a_newer_producers_unknown_event_type_is_refused_with_a_reason() -> None:
    def add(schema: dict[str, Any]) -> None:
        schema["fields"].append(
            {
                "name": "model_registered",
                "default": None,
                "type": [
                    "null",
                    {
                        "type": "record",
                        "name": "ModelRegistered",
                        "fields": [{"name": "model", "type": "string"}],
                    },
                ],
            }
        )

    record = to_record(RunEvent("r", "e", RunFinished("FINISHED", 1)))
    record["run_finished"] = None
    record["model_registered"] = {"model": "m"}
    codec, data = _write_with(_evolved(add), record)
    with pytest.raises(DecodeError, match="has no payload"):
        codec.decode(data, TOPIC)


class _RefusingRegistry:
    """A registry client whose schema lookups fail the way a real registry's can."""

    def __init__(self, status: int, code: int) -> None:
        self.status, self.code = status, code

    def get_schema(self, schema_id: int) -> None:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        raise SchemaRegistryError(self.status, self.code, "refused")


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (401, 401, RegistryUnavailable),  # credentials rotated: wait, every record is fine
        (403, 40301, RegistryUnavailable),
        (404, -1, RegistryUnavailable),  # a proxy's 404 page, not the registry's answer
        (500, 50001, RegistryUnavailable),
        (404, 40403, DecodeError),  # the registry says this schema id does not exist
    ],
)
def test_only_an_unknown_schema_id_is_the_records_fault(
    status: int, code: int, error: type[Exception]
) -> None:
    codec = RegistryCodec(client=_RefusingRegistry(status, code))
    with pytest.raises(error):
        codec.decode(b"\x00\x00\x00\x00\x07\x02", TOPIC)
