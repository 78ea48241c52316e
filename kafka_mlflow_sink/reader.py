"""Reading topics from a chosen point up to where they ended, without a consumer group.

Replay and verify read with manual partition assignment and never commit, so the live sink's
consumer group sees no member join and no offset move. Each partition is read from its start
offset up to its end offset *as it was when reading began*; a partition with nothing in that
range is done at once. With ``follow`` the reader keeps going past those ends instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from kafka_mlflow_sink.errors import ConfigError, SinkError
from kafka_mlflow_sink.kafkalog import describe_kafka_error

logger = logging.getLogger(__name__)

WATERMARK_TIMEOUT = 10.0
# Integers below this are seconds or a typo, not epoch milliseconds (it is 2001-09-09 in ms).
MIN_EPOCH_MS = 1_000_000_000_000
_OFFSET_SPEC = re.compile(r"^(?P<topic>[^:=]+):(?P<partition>\d+)=(?P<offset>\d+)$")


class ReadError(SinkError):
    """The topics cannot be read: unreachable broker, missing topic."""


@dataclass(frozen=True)
class StartAt:
    """Where reading starts: the beginning, a time, or given offsets per partition."""

    timestamp_ms: int | None = None
    offsets: Mapping[tuple[str, int], int] = field(default_factory=dict)

    def describe(self) -> str:
        if self.timestamp_ms is not None:
            return f"from {self.timestamp_ms} ms ({_iso(self.timestamp_ms)})"
        if self.offsets:
            return "from offsets " + ", ".join(
                f"{t}[{p}]@{o}" for (t, p), o in self.offsets.items()
            )
        return "from the beginning"


def parse_timestamp(text: str) -> int:
    """Epoch milliseconds from ISO 8601 or from epoch milliseconds; seconds are refused."""
    text = text.strip()
    if not text:
        raise ConfigError("timestamp is empty; give ISO 8601 with a zone or epoch milliseconds")
    if text.isdigit():
        value = int(text)
        if value >= 2**63:
            raise ConfigError(f"timestamp {text} is out of range")
        if value < MIN_EPOCH_MS:
            raise ConfigError(
                f"timestamp {text} looks like seconds; give epoch milliseconds or ISO 8601"
            )
        return value
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"timestamp {text!r} is neither ISO 8601 nor epoch milliseconds") from exc
    if moment.tzinfo is None:
        raise ConfigError(f"timestamp {text!r} has no time zone; add Z or an offset like +02:00")
    value = int(moment.timestamp() * 1000)
    if value < 0:
        raise ConfigError(f"timestamp {text!r} is before 1970; Kafka has no records then")
    return value


def parse_offsets(specs: tuple[str, ...]) -> dict[tuple[str, int], int]:
    """``topic:partition=offset`` strings (comma-separated or repeated) as a mapping."""
    offsets: dict[tuple[str, int], int] = {}
    for spec in (part.strip() for text in specs for part in text.split(",") if part.strip()):
        match = _OFFSET_SPEC.match(spec)
        if not match:
            raise ConfigError(f"offset {spec!r} must look like topic:partition=offset")
        offsets[(match["topic"], int(match["partition"]))] = int(match["offset"])
    return offsets


@dataclass
class PartitionRange:
    """One partition's reading range: ``start`` up to ``end`` (exclusive), and progress."""

    topic: str
    partition: int
    start: int
    end: int
    position: int = 0

    def __post_init__(self) -> None:
        self.position = self.start

    @property
    def remaining(self) -> int:
        return max(self.end - self.position, 0)

    @property
    def done(self) -> bool:
        return self.position >= self.end

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


class TopicReader:
    """Reads every partition of ``topics`` from ``start_at`` to its end at start-up.

    Args:
        settings: librdkafka consumer settings (bootstrap servers, security).
        topics: topics to read, all their partitions.
        start_at: where to start.
        follow: keep reading past the end offsets, until ``close``.
    """

    def __init__(
        self,
        settings: Mapping[str, object],
        topics: tuple[str, ...],
        start_at: StartAt,
        follow: bool = False,
    ) -> None:
        self.follow = follow
        self._consumer = Consumer(
            {**settings, "enable.auto.commit": False, "enable.partition.eof": True}
        )
        self.ranges = self._plan(topics, start_at)
        self._by_tp = {(r.topic, r.partition): r for r in self.ranges}
        pending = [
            TopicPartition(r.topic, r.partition, r.start)
            for r in self.ranges
            if follow or not r.done
        ]
        self._consumer.assign(pending)

    @property
    def remaining(self) -> int:
        return sum(r.remaining for r in self.ranges)

    @property
    def done(self) -> bool:
        return not self.follow and all(r.done for r in self.ranges)

    def batches(self, max_records: int, max_wait: float) -> Iterator[list[Message]]:
        """Batches in offset order per partition, until every range is done.

        A batch may be empty when nothing arrived within ``max_wait``, so that a caller
        following the topic gets the chance to stop.
        """
        while not self.done:
            yield [m for m in self._consumer.consume(max_records, max_wait) if self._keep(m)]

    def close(self) -> None:
        self._consumer.close()

    def _keep(self, msg: Message) -> bool:
        err = msg.error()
        key = (msg.topic() or "", msg.partition() or 0)
        part = self._by_tp.get(key)
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF and part is not None:
                # The end of the log, even where transaction markers hold the last offsets.
                part.position = max(part.position, msg.offset() or 0)
                self._finish_if_done(part)
                return False
            if err.fatal():
                raise ReadError(f"reading {key[0]}[{key[1]}]: {err.str()}")
            return False
        offset = msg.offset() or 0
        if part is None or (not self.follow and offset >= part.end):
            return False
        part.position = offset + 1
        if self.follow and part.position > part.end:
            part.end = part.position
        self._finish_if_done(part)
        return True

    def _finish_if_done(self, part: PartitionRange) -> None:
        if not self.follow and part.done:
            part.position = part.end
            # Stop fetching what arrived after reading began.
            self._consumer.pause([TopicPartition(part.topic, part.partition)])

    def _plan(self, topics: tuple[str, ...], start_at: StartAt) -> list[PartitionRange]:
        try:
            metadata = self._consumer.list_topics(timeout=WATERMARK_TIMEOUT)
        except KafkaException as exc:
            raise ReadError(f"cannot reach Kafka: {describe_kafka_error(exc)}") from exc
        ranges: list[PartitionRange] = []
        for topic in topics:
            if topic not in metadata.topics:
                raise ReadError(f"topic {topic!r} does not exist")
            for partition in sorted(metadata.topics[topic].partitions):
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=WATERMARK_TIMEOUT
                )
                start = self._start(topic, partition, low, high, start_at)
                ranges.append(PartitionRange(topic, partition, start, high))
        unknown = set(start_at.offsets) - {(r.topic, r.partition) for r in ranges}
        if unknown:
            topic, partition = sorted(unknown)[0]
            raise ConfigError(
                f"offset given for {topic}[{partition}], which is not a partition of the "
                f"topics replayed ({', '.join(topics)})"
            )
        return ranges

    def _start(self, topic: str, partition: int, low: int, high: int, start_at: StartAt) -> int:
        if start_at.offsets:
            # Partitions without a given offset are not read.
            given = start_at.offsets.get((topic, partition), high)
            if given > high:
                logger.warning(
                    "%s[%d]: offset %d is past the partition's end (%d): nothing to read there",
                    topic, partition, given, high,
                )  # fmt: skip
            elif given < low:
                logger.warning(
                    "%s[%d]: offset %d is no longer kept; reading from the earliest, %d",
                    topic, partition, given, low,
                )  # fmt: skip
            return min(max(given, low), high)
        if start_at.timestamp_ms is None:
            return low
        (found,) = self._consumer.offsets_for_times(
            [TopicPartition(topic, partition, start_at.timestamp_ms)], timeout=WATERMARK_TIMEOUT
        )
        # -1: no record at or after that time, so nothing to read in this partition.
        return high if found.offset < 0 else max(found.offset, low)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="milliseconds")
