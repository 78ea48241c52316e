"""The dead-letter topic: where records go that can never be written to MLflow.

A dead letter keeps the original record's key, value and headers and gains headers in the
layout Kafka Connect uses for its dead-letter queues, so existing tooling reads them:

=================================================  ===========================================
header                                             value
=================================================  ===========================================
``__connect.errors.topic``                         origin topic
``__connect.errors.partition``                     origin partition (decimal text)
``__connect.errors.offset``                        origin offset (decimal text)
``__connect.errors.connector.name``                the sink's consumer group
``__connect.errors.stage``                         ``decode`` or ``write``
``__connect.errors.exception.class.name``          the error class, e.g. ``DecodeError``
``__connect.errors.exception.message``             one line saying why
``__connect.errors.timestamp``                     when it was dead-lettered, epoch ms
=================================================  ===========================================
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaError, Message, Producer

from kafka_mlflow_sink.errors import SinkError
from kafka_mlflow_sink.events import now_ms

logger = logging.getLogger(__name__)

HEADER_PREFIX = "__connect.errors."
FLUSH_TIMEOUT = 30.0


class DeadLetterError(SinkError):
    """The broker did not acknowledge a dead letter; nothing may be committed yet."""

    retriable = True

    @property
    def reason(self) -> str:
        return str(self)


@dataclass(frozen=True)
class DeadLetter:
    """A record that can never be written, and why."""

    record: Message
    stage: str
    reason: str
    error_class: str


class DeadLetterWriter:
    """Produces dead letters and waits until the broker acknowledged each one."""

    def __init__(self, producer: Producer, topic: str, connector_name: str) -> None:
        self._producer = producer
        self.topic = topic
        self._connector = connector_name
        self._failures: list[str] = []
        self._lock = threading.Lock()

    def send(self, letters: Sequence[DeadLetter]) -> None:
        """Produce ``letters`` and flush.

        Raises:
            DeadLetterError: a letter was not acknowledged; the caller must not commit.
        """
        if not letters:
            return
        for letter in letters:
            record = letter.record
            logger.warning(
                "%s[%d]@%d dead-lettered to %s: %s",
                record.topic(),
                record.partition(),
                record.offset(),
                self.topic,
                letter.reason,
            )
            self._producer.produce(
                self.topic,
                key=record.key(),
                value=record.value(),
                headers=[*(record.headers() or []), *self._headers(letter)],
                on_delivery=self._delivered,
            )
        left = self._producer.flush(FLUSH_TIMEOUT)
        with self._lock:
            failures, self._failures = self._failures, []
        if left:
            failures.append(f"{left} dead letter(s) unacknowledged after {FLUSH_TIMEOUT:.0f}s")
        if failures:
            raise DeadLetterError(f"dead-letter topic {self.topic}: {failures[0]}")

    def close(self) -> None:
        self._producer.flush(FLUSH_TIMEOUT)

    def _headers(self, letter: DeadLetter) -> list[tuple[str, bytes]]:
        record = letter.record
        values = {
            "topic": record.topic() or "",
            "partition": str(record.partition()),
            "offset": str(record.offset()),
            "connector.name": self._connector,
            "stage": letter.stage,
            "exception.class.name": letter.error_class,
            "exception.message": letter.reason,
            "timestamp": str(now_ms()),
        }
        return [(HEADER_PREFIX + name, value.encode()) for name, value in values.items()]

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            with self._lock:
                self._failures.append(err.str())
