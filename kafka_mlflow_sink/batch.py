"""One batch of records, decoded, written to MLflow and dead-lettered: shared by the sink
daemon and by replay, which differ only in where records come from and what they commit."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from confluent_kafka import Message

from kafka_mlflow_sink.codec import Codec
from kafka_mlflow_sink.deadletter import DeadLetter, DeadLetterWriter
from kafka_mlflow_sink.errors import DecodeError
from kafka_mlflow_sink.plan import Position, SourcedEvent, group_by_run
from kafka_mlflow_sink.writer import MlflowWriter, WriteReport

logger = logging.getLogger(__name__)


@dataclass
class SinkStats:
    """Counters since the sink started."""

    records: int = 0
    batches: int = 0
    points: int = 0
    runs_created: int = 0
    runs_found: int = 0
    artifacts: int = 0
    dead_lettered: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, report: WriteReport) -> None:
        self.points += report.points
        self.runs_created += report.runs_created
        self.runs_found += report.runs_found
        self.artifacts += report.artifacts

    def line(self) -> str:
        return (
            f"{counted(self.records, 'record')} in {counted(self.batches, 'batch')}, "
            f"{counted(self.points, 'metric point')}, "
            f"{counted(self.runs_created, 'run')} created, "
            f"{self.runs_found} found, {counted(self.artifacts, 'artifact')}, "
            f"{self.dead_lettered} dead-lettered"
        )


def counted(n: int, noun: str) -> str:
    """``1 run``, ``2 runs``, ``3 batches``: a count and its noun, for summary lines."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "ch")) else f"{n} {noun}s"


class BatchApplier:
    """Decodes a batch, writes it to MLflow and dead-letters what can never be written.

    Args:
        codec: decodes record values.
        writer: applies write plans to MLflow.
        dead_letters: where refused records go; None logs them instead (replay's default).
        stats: counters to add to.
    """

    def __init__(
        self,
        codec: Codec,
        writer: MlflowWriter,
        dead_letters: DeadLetterWriter | None,
        stats: SinkStats,
    ) -> None:
        self.codec = codec
        self.writer = writer
        self.dead_letters = dead_letters
        self.stats = stats

    def apply(self, records: Sequence[Message], between: Callable[[], None] | None = None) -> int:
        """One attempt at the whole batch; safe to repeat after any failure.

        Returns:
            How many records were dead-lettered.

        Raises:
            TransientWriteError, DeadLetterError: retriable; nothing of the batch may be
                committed yet.
        """
        events, dead = self._decode(records)
        report = self.writer.apply(group_by_run(events), between)
        by_position = {position(m): m for m in records}
        for rejection in report.rejected:
            dead.append(
                DeadLetter(
                    by_position[rejection.position],
                    "write",
                    rejection.reason,
                    "PermanentWriteError",
                )
            )
        if self.dead_letters is not None:
            self.dead_letters.send(dead)
        else:
            for letter in dead:
                logger.warning("%s not written: %s", position(letter.record), letter.reason)
        self.stats.add(report)
        return len(dead)

    def close(self) -> None:
        self.writer.close()
        if self.dead_letters is not None:
            self.dead_letters.close()

    def _decode(self, records: Sequence[Message]) -> tuple[list[SourcedEvent], list[DeadLetter]]:
        events: list[SourcedEvent] = []
        dead: list[DeadLetter] = []
        for msg in records:
            where = position(msg)
            try:
                event = self.codec.decode(msg.value(), where.topic)
            except DecodeError as exc:
                logger.debug("%s cannot be decoded: %s", where, exc)
                dead.append(DeadLetter(msg, "decode", str(exc), type(exc).__name__))
                continue
            events.append(SourcedEvent(event, where))
        return events, dead


def position(msg: Message) -> Position:
    """Where a consumed record sits; consumed records always have all three."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return Position(topic, partition, offset)
