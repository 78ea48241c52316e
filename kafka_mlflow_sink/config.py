"""Typed settings of the sink daemon, validated once at start-up.

Settings come from, highest precedence first: command-line flags, environment variables
(``KAFKA_MLFLOW_SINK_<NAME>``, plus the usual ``KAFKA_BOOTSTRAP_SERVERS`` and
``MLFLOW_TRACKING_URI``), a TOML file given with ``--config``, and the defaults below. Kafka
client settings (security among them) pass through unchanged in ``kafka``; values of keys that
look secret are never logged or printed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kafka_mlflow_sink.errors import ConfigError
from kafka_mlflow_sink.kafkalog import LIBRDKAFKA_LOGGER

FRAMINGS = ("bare", "registry")
_SECRET_KEY = re.compile(
    r"password|secret|token|credential|key\.pem|private|oauthbearer\.config|jaas", re.IGNORECASE
)
# Settings the sink owns: overriding them would break commit after write.
_RESERVED_KAFKA = frozenset({"enable.auto.commit", "enable.auto.offset.store", "group.id"})


@dataclass(frozen=True)
class SinkConfig:
    """Everything the sink daemon needs to run.

    Attributes:
        bootstrap_servers: Kafka brokers, ``host:port[,host:port]``.
        topics: topics of run events to consume.
        group_id: the consumer group; instances sharing it split the partitions.
        tracking_uri: MLflow tracking URI; MLflow's default (``sqlite:///mlflow.db``) when unset.
        dead_letter_topic: where undecodable and refused records go; ``<topic>.dlq`` by default.
        framing: ``bare`` (bundled schema) or ``registry`` (Confluent wire format).
        schema_registry_url: Schema Registry for ``registry`` framing.
        batch_max_records: most records in one batch.
        batch_max_wait: seconds to wait for a batch to fill.
        retry_initial_wait: first backoff, seconds, when MLflow fails transiently.
        retry_max_wait: longest backoff, seconds.
        stats_interval: seconds between progress lines in the log.
        writers: runs written to MLflow at once; 0 picks 4 for a tracking server and 1 for an
            embedded store, which gains nothing from threads.
        auto_offset_reset: where a group with no committed offset starts.
        kafka: extra librdkafka settings for the consumer and the dead-letter producer.
    """

    bootstrap_servers: str
    topics: tuple[str, ...]
    group_id: str = "kafka-mlflow-sink"
    tracking_uri: str | None = None
    dead_letter_topic: str = ""
    framing: str = "bare"
    schema_registry_url: str | None = None
    batch_max_records: int = 5000
    batch_max_wait: float = 0.25
    retry_initial_wait: float = 0.5
    retry_max_wait: float = 30.0
    stats_interval: float = 60.0
    writers: int = 0
    auto_offset_reset: str = "earliest"
    kafka: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        if not self.bootstrap_servers:
            raise ConfigError(
                "bootstrap_servers is required: give -b HOST:PORT (e.g. 127.0.0.1:9092), "
                "KAFKA_BOOTSTRAP_SERVERS, or bootstrap_servers in the --config file"
            )
        if not self.topics or any(not t for t in self.topics):
            raise ConfigError("at least one topic is required")
        if self.framing not in FRAMINGS:
            raise ConfigError(f"framing must be one of {', '.join(FRAMINGS)}, not {self.framing!r}")
        if self.framing == "registry" and not self.schema_registry_url:
            raise ConfigError("framing 'registry' needs schema_registry_url")
        if self.batch_max_records < 1:
            raise ConfigError("batch_max_records must be at least 1")
        if not 0 <= self.writers <= 64:
            raise ConfigError(f"writers must be from 0 (automatic) to 64, not {self.writers}")
        for name in ("batch_max_wait", "retry_initial_wait", "retry_max_wait", "stats_interval"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, not {value}")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError("auto_offset_reset must be 'earliest' or 'latest'")
        masked = sorted(k for k, v in self.kafka.items() if v == "***")
        if masked:
            raise ConfigError(
                f"kafka setting {masked[0]!r} is the mask '***' from a printed "
                "configuration; give the real value"
            )
        if self.tracking_uri and in_memory_store(self.tracking_uri):
            raise ConfigError(
                f"tracking URI {redact_uri(self.tracking_uri)} is an in-memory database: what "
                "the sink writes would be gone when it exits, with its offsets committed"
            )
        for name in ("tracking_uri", "schema_registry_url"):
            value = getattr(self, name)
            if isinstance(value, str) and ":***@" in value:
                raise ConfigError(
                    f"{name} holds the mask '***' from a printed configuration; "
                    "give the real password"
                )
        reserved = sorted(_RESERVED_KAFKA & set(self.kafka))
        if reserved:
            raise ConfigError(f"kafka setting {reserved[0]!r} is managed by the sink")
        if not self.dead_letter_topic:
            object.__setattr__(self, "dead_letter_topic", f"{self.topics[0]}.dlq")
        if self.dead_letter_topic in self.topics:
            raise ConfigError("dead_letter_topic must differ from the consumed topics")

    def _check_types(self) -> None:
        """One precise line for a value of the wrong type (a TOML file can hold anything)."""
        expected = {
            "batch_max_records": int,
            "writers": int,
            "batch_max_wait": float,
            "retry_initial_wait": float,
            "retry_max_wait": float,
            "stats_interval": float,
        }
        for name, kind in expected.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | kind):
                raise ConfigError(f"{name} must be a number, not {value!r}")
            if kind is int and not isinstance(value, int):
                raise ConfigError(f"{name} must be a whole number, not {value!r}")
        for name in (
            "bootstrap_servers",
            "group_id",
            "dead_letter_topic",
            "framing",
            "auto_offset_reset",
            "tracking_uri",
            "schema_registry_url",
        ):
            value = getattr(self, name)
            optional = name in ("tracking_uri", "schema_registry_url")
            if not isinstance(value, str) and not (optional and value is None):
                raise ConfigError(f"{name} must be a string, not {value!r}")
        if not isinstance(self.kafka, Mapping):
            raise ConfigError("kafka must be a table of librdkafka settings")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SinkConfig:
        """Build from loose values (a TOML file, flags), rejecting unknown names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        values = {"bootstrap_servers": "", "topics": (), **values}
        return cls(**values)

    def writer_threads(self) -> int:
        """Runs to write at once: ``writers``, or what suits the kind of tracking URI."""
        if self.writers:
            return self.writers
        scheme = (self.tracking_uri or "").partition("://")[0].lower()
        return 4 if scheme in ("http", "https") else 1

    def consumer_settings(self) -> dict[str, Any]:
        """librdkafka consumer settings; offsets are only ever committed by the sink."""
        return {
            **self.kafka,
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": self.auto_offset_reset,
            "partition.assignment.strategy": self.kafka.get(
                "partition.assignment.strategy", "range"
            ),
            "logger": LIBRDKAFKA_LOGGER,
        }

    def producer_settings(self) -> dict[str, Any]:
        """librdkafka settings of the dead-letter producer."""
        shared = {k: v for k, v in self.kafka.items() if not k.startswith(("fetch.", "session."))}
        return {
            # A dead letter carries a record the broker accepted plus headers: let the broker,
            # not the client's 1 MB default, decide whether it fits.
            "message.max.bytes": 16 * 1024 * 1024,
            **shared,
            "bootstrap.servers": self.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "logger": LIBRDKAFKA_LOGGER,
        }

    def redacted(self) -> dict[str, Any]:
        """The settings with secret values masked, for logs and ``--print-config``."""
        shown: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["kafka"] = redact(self.kafka)
        shown["topics"] = list(self.topics)
        if self.tracking_uri:
            shown["tracking_uri"] = redact_uri(self.tracking_uri)
        if self.schema_registry_url:
            shown["schema_registry_url"] = redact_uri(self.schema_registry_url)
        return shown


def in_memory_store(uri: str) -> bool:
    """Whether ``uri`` names an SQLite database that lives only in the process's memory."""
    scheme, _, rest = uri.partition("://")
    if scheme.split("+")[0].lower() != "sqlite":
        return False
    path, _, query = rest.partition("?")
    return path.lstrip("/") in ("", ":memory:") or ":memory:" in path or "mode=memory" in query


def to_toml(shown: Mapping[str, Any], notes: Mapping[str, str] | None = None) -> str:
    """Settings as a TOML document that ``--config`` reads back; ``notes`` are comments put
    under the keys they are about."""
    lines: list[str] = []
    tables: dict[str, Mapping[str, Any]] = {}
    for key, value in shown.items():
        if isinstance(value, Mapping):
            tables[key] = value
        elif value is None:
            lines.append(f"# {key} is not set: its default applies")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
        if notes and key in notes:
            lines.append(f"# {notes[key]}")
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [
            f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()
        ]
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def redact(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with the values of secret-looking keys replaced by ``***``."""
    return {k: ("***" if _SECRET_KEY.search(k) else v) for k, v in settings.items()}


_SECRET_QUERY = re.compile(
    r"([?&][^=&#\s]*(?:token|password|passwd|secret|key|auth|sig|credential)[^=&#\s]*=)"
    r"[^&#\s'\"]+",
    re.IGNORECASE,
)


def redact_uri(text: str) -> str:
    """``text`` with the secrets of every URI in it masked.

    A password in the user-info part, a user-info part without a password (often a token),
    and query values whose names look secret (``?token=``, ``&sig=``) become ``***``.
    """
    text = re.sub(r"(//[^:/@\s]+:)[^@/\s]+@", r"\1***@", text)
    text = re.sub(r"//[^:/@\s'\"]+@", "//***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; one precise error for a malformed pair."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {pair.split('=')[0]!r} must look like KEY=VALUE")
        result[key.strip()] = value
    return result
