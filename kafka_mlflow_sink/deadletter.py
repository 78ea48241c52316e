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
``__connect.errors.value.dropped``                 only when the value was too large to keep
=================================================  ===========================================
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from kafka_mlflow_sink.errors import SinkError
from kafka_mlflow_sink.events import now_ms

logger = logging.getLogger(__name__)

HEADER_PREFIX = "__connect.errors."
Header = tuple[str, str | bytes | None]
FLUSH_TIMEOUT = 30.0
_SIZE_ERRORS = (KafkaError.MSG_SIZE_TOO_LARGE,)


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
        self._lock = threading.Lock()

    def send(self, letters: Sequence[DeadLetter]) -> None:
        """Produce ``letters`` and flush.

        A letter too large for the dead-letter topic goes again without its value, with a
        header saying so: the origin headers still lead to the record in its own topic.

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
        too_large = self._produce_all(letters, keep_value=True)
        if too_large:
            logger.warning(
                "%d dead letter(s) too large for %s; sent without their value",
                len(too_large),
                self.topic,
            )
            if self._produce_all(too_large, keep_value=False):
                raise DeadLetterError(
                    f"dead-letter topic {self.topic}: letters too large even without their value"
                )

    def _produce_all(self, letters: Sequence[DeadLetter], keep_value: bool) -> list[DeadLetter]:
        """Produce and flush; return the letters refused for their size, raise on others."""
        failures: list[tuple[DeadLetter, KafkaError]] = []

        def delivered(letter: DeadLetter) -> Callable[[KafkaError | None, Message], None]:
            def report(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    with self._lock:
                        failures.append((letter, err))

            return report

        for letter in letters:
            record = letter.record
            headers = [*(record.headers() or []), *self._headers(letter)]
            value = record.value()
            if not keep_value:
                size = str(len(value or b""))
                headers.append((HEADER_PREFIX + "value.dropped", f"{size} bytes".encode()))
                value = None
            try:
                self._produce(record.key(), value, headers, delivered(letter))
            except KafkaException as exc:
                failures.append((letter, exc.args[0]))
        left = self._producer.flush(FLUSH_TIMEOUT)
        if left:
            raise DeadLetterError(
                f"dead-letter topic {self.topic}: {left} letter(s) "
                f"unacknowledged after {FLUSH_TIMEOUT:.0f}s"
            )
        too_large = [letter for letter, err in failures if err.code() in _SIZE_ERRORS]
        others = [err for _letter, err in failures if err.code() not in _SIZE_ERRORS]
        if others:
            raise DeadLetterError(f"dead-letter topic {self.topic}: {others[0].str()}")
        return too_large

    def _produce(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[Header],
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    self.topic, key=key, value=value, headers=headers, on_delivery=on_delivery
                )
                return
            except BufferError:
                # The local queue is full: let the producer send some before trying again.
                self._producer.poll(0.5)

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
