"""Avro encoding and decoding of run events, in two framings.

* ``bare``: the Avro binary of one ``RunEvent``, written and read with the schema bundled in
  this package. No registry is needed; producer and sink must agree on the schema version.
* ``registry``: the Confluent wire format (magic byte 0, a 4-byte schema id, then Avro
  binary). confluent-kafka's serializer registers the writer schema under the subject
  ``<topic>-value``; its deserializer fetches the writer schema by id and resolves it against
  the bundled reader schema, so older and newer producers keep working.

Any record that cannot be turned into a ``RunEvent`` raises ``DecodeError`` with the reason.
"""

from __future__ import annotations

import io
import json
from functools import cache
from importlib import resources
from typing import Any, Literal, Protocol

import fastavro
from confluent_kafka.serialization import MessageField, SerializationContext

from kafka_mlflow_sink.errors import ConfigError, DecodeError, describe
from kafka_mlflow_sink.events import RunEvent, from_record, to_record

Framing = Literal["bare", "registry"]
SCHEMA_FILE = "run_event.v1.avsc"


@cache
def schema_text() -> str:
    """The bundled Avro schema of ``RunEvent``, as JSON text."""
    return resources.files("kafka_mlflow_sink").joinpath("schemas", SCHEMA_FILE).read_text()


@cache
def parsed_schema() -> Any:
    """The bundled schema, parsed by fastavro."""
    return fastavro.parse_schema(json.loads(schema_text()))


class Codec(Protocol):
    """Turns run events into record values and back."""

    def encode(self, event: RunEvent, topic: str) -> bytes: ...

    def decode(self, value: bytes | None, topic: str) -> RunEvent: ...


class BareCodec:
    """Avro binary without framing, read with the bundled schema."""

    def encode(self, event: RunEvent, topic: str) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, parsed_schema(), to_record(event))
        return out.getvalue()

    def decode(self, value: bytes | None, topic: str) -> RunEvent:
        if value is None:
            raise DecodeError("record has no value (a tombstone); run events are never null")
        buffer = io.BytesIO(value)
        try:
            record = fastavro.schemaless_reader(buffer, parsed_schema(), parsed_schema())
        except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError, ...
            raise DecodeError(f"not a bare Avro run event: {describe(exc)}") from exc
        if buffer.tell() != len(value):
            extra = len(value) - buffer.tell()
            raise DecodeError(f"bare Avro run event followed by {extra} unexpected bytes")
        if not isinstance(record, dict):
            raise DecodeError("bare Avro value is not a record")
        return from_record(record)


class RegistryCodec:
    """The Confluent wire format, with schemas resolved through a Schema Registry."""

    def __init__(
        self,
        registry_url: str | None = None,
        registry_config: dict[str, str] | None = None,
        client: Any = None,
    ) -> None:
        """Use the registry at ``registry_url``, or an existing ``client`` to share one."""
        # Imported here: the registry client pulls in an HTTP stack that bare framing never needs.
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer

        if client is None:
            try:
                client = SchemaRegistryClient.new_client(
                    {"url": registry_url, **(registry_config or {})}
                )
            except Exception as exc:
                raise ConfigError(f"invalid Schema Registry settings: {describe(exc)}") from exc
        self.client = client
        self._serializer = AvroSerializer(
            client, schema_text(), conf={"auto.register.schemas": True}
        )
        self._deserializer = AvroDeserializer(client, schema_text())

    def encode(self, event: RunEvent, topic: str) -> bytes:
        ctx = SerializationContext(topic, MessageField.VALUE)
        data = self._serializer(to_record(event), ctx)
        assert data is not None
        return bytes(data)

    def decode(self, value: bytes | None, topic: str) -> RunEvent:
        if value is None:
            raise DecodeError("record has no value (a tombstone); run events are never null")
        if value[:1] != b"\x00":
            raise DecodeError("not in the Schema Registry wire format: first byte is not 0x00")
        try:
            record = self._deserializer(value, SerializationContext(topic, MessageField.VALUE))
        except Exception as exc:  # SerializationError, registry lookups, fastavro errors
            raise DecodeError(f"not a registry-framed run event: {describe(exc)}") from exc
        if not isinstance(record, dict):
            raise DecodeError("registry-framed value is not a record")
        return from_record(record)


def make_codec(framing: str, registry_url: str | None = None) -> Codec:
    """The codec for ``framing``; ``registry`` needs ``registry_url``."""
    if framing == "bare":
        return BareCodec()
    if framing == "registry":
        if not registry_url:
            raise ConfigError("framing 'registry' needs a Schema Registry URL")
        return RegistryCodec(registry_url)
    raise ConfigError(f"unknown framing {framing!r}; expected 'bare' or 'registry'")
