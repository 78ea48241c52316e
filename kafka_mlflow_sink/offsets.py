"""Start-up checks against Kafka, and where a consumer group stands on its topics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from kafka_mlflow_sink.config import SinkConfig
from kafka_mlflow_sink.errors import SinkError
from kafka_mlflow_sink.kafkalog import QUIET_LOGGER, describe_kafka_error

CHECK_TIMEOUT = 10.0


class KafkaUnavailable(SinkError):
    """The broker cannot be reached, or a topic the sink needs is missing."""


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int  # -1 when the group has committed nothing yet
    end: int

    @property
    def lag(self) -> int:
        return self.end - max(self.committed, 0)


def _consumer(config: SinkConfig) -> Consumer:
    settings = config.consumer_settings()
    settings.update({"enable.partition.eof": False, "logger": QUIET_LOGGER})
    return Consumer(settings)


def check_kafka(config: SinkConfig, need_topics: bool = True) -> None:
    """Fail with one line when the broker is unreachable or a consumed topic is missing."""
    consumer = _consumer(config)
    try:
        metadata = consumer.list_topics(timeout=CHECK_TIMEOUT)
    except KafkaException as exc:
        raise KafkaUnavailable(
            f"cannot reach Kafka at {config.bootstrap_servers} within {CHECK_TIMEOUT:.0f}s "
            f"({describe_kafka_error(exc)})"
        ) from exc
    finally:
        consumer.close()
    missing = [t for t in config.topics if t not in metadata.topics]
    if missing and need_topics:
        raise KafkaUnavailable(f"topic {missing[0]!r} does not exist on {config.bootstrap_servers}")


def group_lag(config: SinkConfig) -> list[PartitionLag]:
    """Committed offset, end offset and lag of ``config.group_id`` on every partition."""
    consumer = _consumer(config)
    try:
        metadata = consumer.list_topics(timeout=CHECK_TIMEOUT)
        missing = [t for t in config.topics if t not in metadata.topics]
        if missing:
            raise KafkaUnavailable(
                f"topic {missing[0]!r} does not exist on {config.bootstrap_servers}"
            )
        partitions = [
            TopicPartition(topic, p)
            for topic in config.topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        committed = consumer.committed(partitions, timeout=CHECK_TIMEOUT)
        rows = []
        for tp in committed:
            _low, high = consumer.get_watermark_offsets(tp, timeout=CHECK_TIMEOUT)
            rows.append(PartitionLag(tp.topic, tp.partition, tp.offset, high))
        return rows
    except KafkaException as exc:
        raise KafkaUnavailable(
            f"cannot read offsets from {config.bootstrap_servers}: {describe_kafka_error(exc)}"
        ) from exc
    finally:
        consumer.close()


def create_topics(config: SinkConfig, partitions: int, replication: int) -> dict[str, str]:
    """Create the run-events topics and the dead-letter topic; existing ones are kept.

    Returns:
        Per topic, ``created`` or ``exists (N partitions)``.
    """
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    check_kafka(config, need_topics=False)
    settings: dict[str, Any] = {
        k: v
        for k, v in config.consumer_settings().items()
        if not k.startswith(("group.", "enable.", "auto.", "partition."))
    }
    settings["logger"] = QUIET_LOGGER
    admin = AdminClient(settings)
    wanted = [*config.topics, config.dead_letter_topic]
    futures = admin.create_topics(
        [NewTopic(t, partitions, replication) for t in wanted], request_timeout=CHECK_TIMEOUT
    )
    outcome: dict[str, str] = {}
    for topic, future in futures.items():
        try:
            future.result(CHECK_TIMEOUT)
            outcome[topic] = "created"
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                outcome[topic] = "exists"
                continue
            raise KafkaUnavailable(
                f"cannot create topic {topic!r}: {err.str() if err is not None else exc}"
            ) from exc
        except TimeoutError as exc:
            raise KafkaUnavailable(
                f"Kafka at {config.bootstrap_servers} did not create {topic!r} within "
                f"{CHECK_TIMEOUT:.0f}s"
            ) from exc
    existing = [t for t, state in outcome.items() if state == "exists"]
    if existing:
        metadata = admin.list_topics(timeout=CHECK_TIMEOUT)
        for topic in existing:
            found = metadata.topics.get(topic)
            if found is not None:
                outcome[topic] = f"exists ({len(found.partitions)} partitions)"
    return outcome
