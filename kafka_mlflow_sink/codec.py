"""Avro encoding and decoding of run events, in two framings.

* ``bare``: the Avro binary of one ``RunEvent``, written and read with the schema bundled in
  this package. No registry is needed; producer and sink must agree on the schema version.
* ``registry``: the Confluent wire format (magic byte 0, a 4-byte schema id, then Avro
  binary). confluent-kafka's serializer registers the writer schema under the subject
  ``<topic>-value``. Decoding fetches the writer schema by id through confluent-kafka's
  registry client (which caches it) and resolves it against the bundled reader schema, so
  older and newer producers keep working. The body is read here rather than by the library's
  deserializer so that bytes left over after the event are noticed, as in bare framing.

Any record that cannot be turned into a ``RunEvent`` raises ``DecodeError`` with the reason.
A registry that cannot be asked (down, 5xx) raises ``RegistryUnavailable`` instead: that is a
moment, not the record, and the sink waits for it rather than dead-lettering.
"""

from __future__ import annotations

import io
import json
import warnings
from functools import cache
from importlib import resources
from typing import Any, Literal, Protocol

import fastavro
from confluent_kafka.serialization import MessageField, SerializationContext

from kafka_mlflow_sink.config import redact_uri
from kafka_mlflow_sink.errors import (
    ConfigError,
    DecodeError,
    RegistryUnavailable,
    concise,
    describe,
)
from kafka_mlflow_sink.events import RunEvent, from_record, to_record

Framing = Literal["bare", "registry"]
SCHEMA_FILE = "run_event.v1.avsc"
REGISTRY_TIMEOUT = 30  # seconds for one Schema Registry request


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


def _avro_failure(exc: BaseException) -> str:
    """What fastavro's failure to read a value means, in words a producer's owner can act on."""
    if isinstance(exc, EOFError):
        # fastavro's own text ("Expected -1 bytes, read 9") says nothing to a reader.
        return "the value ends before the event does (truncated, or not Avro at all)"
    return describe(exc)


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
            raise DecodeError(f"not a bare Avro run event: {_avro_failure(exc)}") from exc
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
        # authlib, under the registry client, warns about its own httpx module on import and
        # forces that warning on; recording it keeps it off the user's terminal.
        with warnings.catch_warnings(record=True):
            from confluent_kafka.schema_registry import SchemaRegistryClient
            from confluent_kafka.schema_registry.avro import AvroSerializer

        if client is None:
            try:
                client = SchemaRegistryClient.new_client(
                    # Without a timeout a registry that accepts and never answers would
                    # hold the sink for ever, deaf to SIGTERM.
                    {"url": registry_url, "timeout": REGISTRY_TIMEOUT, **(registry_config or {})}
                )
            except Exception as exc:
                raise ConfigError(f"invalid Schema Registry settings: {describe(exc)}") from exc
        self.client = client
        self._serializer = AvroSerializer(
            client, schema_text(), conf={"auto.register.schemas": True}
        )
        self._writer_schemas: dict[int, Any] = {}

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
        if len(value) < 5:
            raise DecodeError(f"Schema Registry frame of {len(value)} bytes has no schema id")
        schema_id = int.from_bytes(value[1:5], "big")
        buffer = io.BytesIO(value)
        buffer.seek(5)
        try:
            record = fastavro.schemaless_reader(
                buffer, self._writer_schema(schema_id), parsed_schema()
            )
        except (DecodeError, RegistryUnavailable):
            raise
        except Exception as exc:  # fastavro raises EOFError, ValueError, SchemaResolutionError...
            raise DecodeError(
                f"not a registry-framed run event (schema id {schema_id}): {_avro_failure(exc)}"
            ) from exc
        if buffer.tell() != len(value):
            extra = len(value) - buffer.tell()
            raise DecodeError(f"registry-framed run event followed by {extra} unexpected bytes")
        if not isinstance(record, dict):
            raise DecodeError("registry-framed value is not a record")
        return from_record(record)

    def _writer_schema(self, schema_id: int) -> Any:
        """The parsed schema a producer wrote with, fetched once per id."""
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        parsed = self._writer_schemas.get(schema_id)
        if parsed is not None:
            return parsed
        try:
            schema = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404 and exc.error_code in (40403, 40400):
                raise DecodeError(
                    f"schema id {schema_id} is unknown to the Schema Registry"
                ) from exc
            # Anything else (401 after a credential rotation, 403, a 404 page from a proxy,
            # 5xx) is the registry's state, not the record's: wait rather than dead-letter.
            said = concise(describe(exc))[:200]
            raise RegistryUnavailable(f"Schema Registry answers {said}") from exc
        except Exception as exc:  # connection refused, timeouts, DNS
            raise RegistryUnavailable(f"Schema Registry unreachable: {describe(exc)}") from exc
        if (schema.schema_type or "AVRO") != "AVRO":
            raise DecodeError(f"schema id {schema_id} is {schema.schema_type}, not Avro")
        try:
            parsed = fastavro.parse_schema(json.loads(schema.schema_str))
        except Exception as exc:
            reason = f"schema id {schema_id} is not a usable Avro schema: {describe(exc)}"
            raise DecodeError(reason) from exc
        self._writer_schemas[schema_id] = parsed
        return parsed


def make_codec(framing: str, registry_url: str | None = None) -> Codec:
    """The codec for ``framing``; ``registry`` needs ``registry_url``."""
    if framing == "bare":
        return BareCodec()
    if framing == "registry":
        if not registry_url:
            raise ConfigError("framing 'registry' needs a Schema Registry URL")
        return RegistryCodec(registry_url)
    raise ConfigError(f"unknown framing {framing!r}; expected 'bare' or 'registry'")


def check_registry(codec: Codec, registry_url: str | None) -> None:
    """Fail with one line when the codec needs a Schema Registry that does not answer.

    Raises:
        RegistryUnavailable: the registry cannot be reached or refuses the request.
    """
    if not isinstance(codec, RegistryCodec):
        return
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    where = redact_uri(registry_url or "(the configured registry)")
    try:
        codec.client.get_subjects()
    except SchemaRegistryError as exc:
        if 400 <= exc.http_status_code < 500 and exc.http_status_code not in (401, 403, 408, 429):
            raise ConfigError(
                f"{where} does not answer like a Schema Registry "
                f"(HTTP {exc.http_status_code} for /subjects)"
            ) from exc
        reason = concise(describe(exc))[:200]
        raise RegistryUnavailable(f"the Schema Registry at {where} answers {reason}") from exc
    except Exception as exc:
        reason = concise(describe(exc))[:200]
        raise RegistryUnavailable(f"cannot reach the Schema Registry at {where}: {reason}") from exc
