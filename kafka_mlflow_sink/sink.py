"""The sink loop: Kafka records in, MLflow writes out, offsets committed after the writes.

One turn of the loop handles one batch:

1. **poll**: take up to ``batch_max_records`` records, waiting at most ``batch_max_wait``.
2. **decode**: each record becomes a run event, or a dead letter when it cannot be decoded.
3. **plan and write**: the writer folds the events by run and applies them to MLflow. A
   transient failure pauses every assigned partition and retries the whole batch with
   exponential backoff and jitter, polling Kafka between attempts so the sink stays in its
   consumer group. Writes are idempotent, so a retry after a partial write is safe.
4. **dead-letter**: records MLflow refuses for good, and undecodable ones, are produced to the
   dead-letter topic with their origin in the headers, and the producer is flushed: the
   broker has acknowledged them before anything is committed.
5. **commit**: per partition, the offset after the batch's last record, synchronously.

Promises kept here: an offset is committed only after every record below it was written to
MLflow or acknowledged on the dead-letter topic (commit after write); when partitions are
revoked while a batch is being retried, the batch is abandoned uncommitted and the next owner
redoes it (rebalance safety); a stop request ends the loop at the next poll or retry wait,
commits nothing unwritten, and leaves the group (clean shutdown).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    wait_exponential,
)

from kafka_mlflow_sink.batch import BatchApplier, SinkStats, position
from kafka_mlflow_sink.codec import Codec
from kafka_mlflow_sink.config import SinkConfig
from kafka_mlflow_sink.deadletter import DeadLetterWriter
from kafka_mlflow_sink.errors import (
    Abandoned,
    RegistryUnavailable,
    SinkError,
    TransientWriteError,
)
from kafka_mlflow_sink.kafkalog import LIBRDKAFKA_LOGGER, describe_kafka_error
from kafka_mlflow_sink.throttle import backoff
from kafka_mlflow_sink.writer import MlflowWriter

logger = logging.getLogger(__name__)

# Set to "before-commit" to make the daemon kill itself between writing a batch and
# committing it: how the tests prove a crash at the worst moment loses and duplicates nothing.
FAILPOINT_ENV = "KAFKA_MLFLOW_SINK_FAILPOINT"
# While a batch is written, poll Kafka at least this often (seconds): it keeps the member in
# its group however long MLflow takes, and lets a stop or a rebalance end the batch early.
KEEPALIVE_INTERVAL = 2.0
# After this many attempts fail with the same kind of MLflow-side error (a 500) while MLflow
# answers other requests, the records it keeps failing on are treated as refused.
ESCALATE_AFTER_ATTEMPTS = 6


def _commit_retriable(exc: BaseException) -> bool:
    """A commit that failed because the group coordinator is moving or loading."""
    if not isinstance(exc, KafkaException) or not exc.args:
        return False
    err = exc.args[0]
    return isinstance(err, KafkaError) and (
        err.retriable()
        or err.code() in (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    )


# A fresh broker answers the first commits with NOT_COORDINATOR while it loads the offsets
# topic; librdkafka does not retry synchronous commits, so the sink does, briefly.
COMMIT_RETRY: dict[str, Any] = {
    "retry": retry_if_exception(_commit_retriable),
    "wait": wait_exponential(multiplier=0.2, max=2.0),
    "stop": stop_after_attempt(6),
    "reraise": True,
}


class Sink:
    """A sink instance: one member of the consumer group, writing into one MLflow.

    Args:
        config: validated settings.
        codec: decodes record values into run events.
        writer: applies write plans to MLflow.
    """

    def __init__(self, config: SinkConfig, codec: Codec, writer: MlflowWriter) -> None:
        self.config = config
        self.codec = codec
        self.writer = writer
        self.stats = SinkStats()
        self._applier = BatchApplier(
            codec,
            writer,
            DeadLetterWriter(
                Producer(config.producer_settings()), config.dead_letter_topic, config.group_id
            ),
            self.stats,
        )
        self._stop = threading.Event()
        self._revoked = False
        self._paused = False
        self._last_poll = time.monotonic()
        self._waiting_since = self._last_wait_report = 0.0
        self._waiting_for = "MLflow"
        self._carry: list[Message] = []
        self._committed: dict[tuple[str, int], int] = {}
        self._failpoint = os.environ.get(FAILPOINT_ENV)
        self._consumer = Consumer(config.consumer_settings())

    # -- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop; safe from a signal handler or another thread."""
        self._stop.set()

    def run(self) -> SinkStats:
        """Consume until ``stop`` is called, then leave the group and close."""
        self._consumer.subscribe(
            list(self.config.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        window = (time.monotonic(), 0)  # start of the progress window, records then
        try:
            while not self._stop.is_set():
                records = self._poll()
                if records:
                    self._handle(records)
                elif not self._carry:
                    self._commit_skipped_markers()
                if time.monotonic() - window[0] >= self.config.stats_interval:
                    window = self._report_progress(window)
        finally:
            self._close()
        return self.stats

    def _report_progress(self, window: tuple[float, int]) -> tuple[float, int]:
        """Log progress over the last window, unless no record was committed in it."""
        started, records = window
        now = time.monotonic()
        if self.stats.records != records:
            rate = (self.stats.records - records) / max(now - started, 1e-9)
            logger.info("progress: %s; %.0f records/s lately", self.stats.line(), rate)
        return now, self.stats.records

    def _close(self) -> None:
        logger.info("stopping: %s", self.stats.line())
        self._applier.close()
        # close() leaves the group at once, so partitions move to other members quickly.
        self._consumer.close()

    # -- one batch ----------------------------------------------------------------------

    def _poll(self) -> list[Message]:
        """The next batch: what has arrived, or what arrives within ``batch_max_wait``.

        Records that came in while the last batch was being written have waited already:
        they are taken at once, without waiting for the batch to fill. Only a poll that
        finds nothing waiting waits up to ``batch_max_wait``, so under load the sink writes
        back to back, and at a trickle it still gathers records into batches.
        """
        carried, self._carry = self._carry, []
        wanted = self.config.batch_max_records - len(carried)
        if wanted <= 0:
            return carried

        def take(timeout: float) -> list[Message]:
            return [m for m in self._consumer.consume(wanted, timeout) if self._usable(m)]

        fresh = take(0)
        if not fresh and not carried:
            fresh = take(self.config.batch_max_wait)
        return carried + fresh

    def _usable(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.fatal():
            raise KafkaException(err)
        # Broker and network trouble is retried inside librdkafka; its logger drops repeats.
        LIBRDKAFKA_LOGGER.warning("Kafka reports %s; librdkafka keeps retrying", err.str())
        return False

    def _handle(self, records: list[Message]) -> None:
        self._revoked = False
        began = time.monotonic()
        try:
            dead = self._write_with_retries(records)
        except Abandoned as why:
            logger.info("batch of %d records abandoned uncommitted: %s", len(records), why)
            self._rewind(records)
            return
        if self._failpoint == "before-commit":
            # Test hook: die as if killed after MLflow accepted the batch, before the commit.
            os.kill(os.getpid(), signal.SIGKILL)
        written = time.monotonic()
        self._commit(records)
        logger.debug(
            "batch of %d records written in %.0f ms, committed in %.0f ms",
            len(records),
            (written - began) * 1000,
            (time.monotonic() - written) * 1000,
        )
        self.stats.records += len(records)
        self.stats.batches += 1
        self.stats.dead_lettered += dead

    def _write_with_retries(self, records: list[Message]) -> int:
        """Write the batch to MLflow and dead-letter what it refuses; retry transient failures.

        Returns:
            How many records went to the dead-letter topic.
        """
        retrying = Retrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, SinkError) and exc.retriable),
            wait=backoff(self.config.retry_initial_wait, self.config.retry_max_wait),
            stop=stop_never,
            sleep=self._wait_polling,
            before_sleep=self._on_retry,
            reraise=True,
        )
        try:
            dead = retrying(self._write_once, records)
        except Abandoned:
            self._resume_if_paused()
            raise
        finally:
            escalated, self.writer.escalate_ambiguous = self.writer.escalate_ambiguous, False
        if self._paused:
            attempts = retrying.statistics.get("attempt_number", 0)
            if escalated:
                logger.info(
                    "batch settled after %s attempts: what MLflow kept failing on was "
                    "dead-lettered; partitions resumed",
                    attempts,
                )
            else:
                logger.info(
                    "%s answers again after %s attempts; partitions resumed",
                    self._waiting_for,
                    attempts,
                )
            self._resume_if_paused()
        return int(dead)

    def _write_once(self, records: list[Message]) -> int:
        return self._applier.apply(records, between=self._keepalive)

    def _keepalive(self) -> None:
        """Between MLflow calls: poll now and then; end the batch on a stop or a rebalance."""
        if time.monotonic() - self._last_poll >= KEEPALIVE_INTERVAL:
            self._last_poll = time.monotonic()
            msg = self._consumer.poll(0)
            if msg is not None and self._usable(msg):
                self._carry.append(msg)
        if self._stop.is_set():
            raise Abandoned("stop requested")
        if self._revoked:
            raise Abandoned("partitions revoked")

    def _rewind(self, records: Sequence[Message]) -> None:
        """Make the partitions still assigned deliver the abandoned records again.

        The consumer's position is past them; without the seek the next batch would start
        after them and a later commit would skip them for good.
        """
        first: dict[tuple[str, int], int] = {}
        for msg in records:
            where = position(msg)
            key = (where.topic, where.partition)
            first[key] = min(first.get(key, where.offset), where.offset)
        assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        for (topic, partition), offset in first.items():
            if (topic, partition) not in assigned:
                continue
            try:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                (now,) = self._consumer.position([TopicPartition(topic, partition)])
                if now.offset < 0 or now.offset <= offset:
                    continue  # newly assigned: it starts from the committed offset anyway
                # Its position is past records never written, and any later commit would
                # skip them: stop, so that a restart resumes from the committed offsets.
                raise SinkError(
                    f"cannot rewind {topic}[{partition}] to {offset} after an abandoned batch "
                    f"({describe_kafka_error(exc)}); stopped so a restart resumes from the "
                    "committed offsets"
                ) from exc
            self._carry = [
                m for m in self._carry if (m.topic(), m.partition()) != (topic, partition)
            ]
        self._resume_all()

    def _commit_skipped_markers(self) -> None:
        """After an empty poll, commit positions that moved past records the sink never sees.

        Transaction markers and aborted records occupy offsets but are never returned, so a
        log ending in one would show lag for ever. An empty poll with nothing carried means
        every record below each position was handed to the sink and committed already.
        """
        ahead = []
        for tp in self._consumer.position(self._consumer.assignment()):
            key = (tp.topic, tp.partition)
            if tp.offset >= 0 and key in self._committed and tp.offset > self._committed[key]:
                ahead.append(TopicPartition(tp.topic, tp.partition, tp.offset))
        if ahead:
            self._commit_offsets(ahead)

    def _commit(self, records: Sequence[Message]) -> None:
        """Commit past the batch. Runs only after MLflow accepted every record of it and the
        broker acknowledged every dead letter."""
        offsets: dict[tuple[str, int], int] = {}
        for msg in records:
            where = position(msg)
            tp = (where.topic, where.partition)
            offsets[tp] = max(offsets.get(tp, -1), where.offset + 1)
        self._commit_offsets([TopicPartition(t, p, o) for (t, p), o in offsets.items()])

    def _commit_offsets(self, commit: list[TopicPartition]) -> None:
        try:
            for attempt in Retrying(**COMMIT_RETRY):
                with attempt:
                    self._consumer.commit(offsets=commit, asynchronous=False)
        except KafkaException as exc:
            # The writes stand; whoever owns the partitions next re-reads them, idempotently.
            logger.warning(
                "commit failed (%s); the records will be delivered again", describe_kafka_error(exc)
            )
            return
        for tp in commit:
            self._committed[(tp.topic, tp.partition)] = tp.offset
        logger.debug(
            "committed %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in commit)
        )

    # -- waiting for MLflow -------------------------------------------------------------

    def _on_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        reason = getattr(exc, "reason", exc)
        if (
            state.attempt_number >= ESCALATE_AFTER_ATTEMPTS
            and isinstance(exc, TransientWriteError)
            and exc.ambiguous
            and not self.writer.escalate_ambiguous
        ):
            self.writer.escalate_ambiguous = True
            logger.warning(
                "MLflow keeps answering with an error (%s); if it answers other "
                "requests, the records it fails on are dead-lettered",
                reason,
            )
        if state.attempt_number == 1:
            self._pause()
            self._waiting_since = self._last_wait_report = time.monotonic()
            registry = isinstance(exc, RegistryUnavailable)
            self._waiting_for = "the Schema Registry" if registry else "MLflow"
            logger.warning(
                "%s failed (%s); partitions paused, retrying with backoff, nothing "
                "committed until it succeeds",
                "Schema Registry lookup" if registry else "MLflow write",
                reason,
            )
        elif time.monotonic() - self._last_wait_report >= self.config.stats_interval:
            # One WARNING per outage; a reminder now and then shows the sink is alive.
            self._last_wait_report = time.monotonic()
            logger.info(
                "still waiting for %s after %d attempts and %.0fs: %s",
                self._waiting_for,
                state.attempt_number,
                time.monotonic() - self._waiting_since,
                reason,
            )
        else:
            logger.debug(
                "attempt %d failed (%s); next in %.1fs",
                state.attempt_number,
                getattr(exc, "reason", exc),
                wait,
            )

    def _wait_polling(self, seconds: float) -> None:
        """Sleep between attempts while polling Kafka, so the group keeps this member."""
        deadline = time.monotonic() + seconds
        while True:
            if self._stop.is_set():
                raise Abandoned("stop requested while waiting for MLflow")
            if self._revoked:
                raise Abandoned("partitions revoked while waiting for MLflow")
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if time.monotonic() - self._last_wait_report >= self.config.stats_interval:
                # A long pause (a Retry-After) still shows the sink alive now and then.
                self._last_wait_report = time.monotonic()
                logger.info(
                    "still waiting for %s after %.0fs; next attempt in %.0fs",
                    self._waiting_for,
                    time.monotonic() - self._waiting_since,
                    left,
                )
            msg = self._consumer.poll(min(left, 0.5))
            self._last_poll = time.monotonic()
            if msg is not None and self._usable(msg):
                # Fetched before the pause took effect, or from partitions assigned during
                # this poll: keep it, in order, for the next batch.
                self._carry.append(msg)

    def _pause(self) -> None:
        assignment = self._consumer.assignment()
        if assignment:
            self._consumer.pause(assignment)
        self._paused = True

    def _resume_if_paused(self) -> None:
        if self._paused:
            self._resume_all()

    def _resume_all(self) -> None:
        self._paused = False
        assignment = self._consumer.assignment()
        if assignment:
            self._consumer.resume(assignment)

    # -- rebalances ---------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("partitions assigned: %s", _names(partitions))
        # Runs of partitions this member did not hold may have been written by another one.
        self.writer.forget_runs()
        try:
            committed = consumer.committed(partitions, timeout=10)
        except KafkaException as exc:
            logger.debug("committed offsets unknown (%s)", describe_kafka_error(exc))
            return
        for tp in committed:
            if tp.offset >= 0:
                self._committed[(tp.topic, tp.partition)] = tp.offset

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Everything written was committed before the next poll, so nothing written is lost
        # here; a batch still being retried is abandoned and redone by the next owner.
        logger.info("partitions revoked: %s", _names(partitions))
        self._revoked = True
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._carry = [m for m in self._carry if (m.topic(), m.partition()) not in gone]


def _names(partitions: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "none"
