"""Replay: rebuild MLflow from a topic, faithfully and idempotently.

Replay reads with manual assignment under a group id of its own and never commits, so the live
sink's consumer group is never disturbed (see ``reader``). Records go through the same
``BatchApplier`` as the daemon's, so a run is found by its run key and what MLflow already
holds is skipped: replaying twice, or over what the live sink wrote, changes nothing.

MLflow failures are retried with backoff as in the daemon, but for at most ``retry_limit``
seconds per batch: somebody is waiting for a one-shot replay to finish or fail.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message, Producer
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
)

from kafka_mlflow_sink.batch import BatchApplier, SinkStats, counted
from kafka_mlflow_sink.codec import Codec
from kafka_mlflow_sink.config import SinkConfig
from kafka_mlflow_sink.deadletter import DeadLetterWriter
from kafka_mlflow_sink.errors import Abandoned, SinkError
from kafka_mlflow_sink.reader import StartAt, TopicReader
from kafka_mlflow_sink.throttle import backoff
from kafka_mlflow_sink.writer import MlflowWriter

logger = logging.getLogger(__name__)


class ReplayInterrupted(Exception):
    """A stop was requested while waiting for MLflow."""


@dataclass
class ReplayResult:
    """What a replay did, for its summary."""

    stats: SinkStats
    elapsed: float
    remaining: int
    interrupted: bool

    def summary(self) -> str:
        s = self.stats
        state = "stopped" if self.interrupted else "complete"
        return (
            f"replay {state}: {counted(s.records, 'record')}, "
            f"{counted(s.runs_created, 'run')} created, {s.runs_found} found, "
            f"{counted(s.points, 'metric point')} written, "
            f"{counted(s.artifacts, 'artifact')} (re)written, "
            f"{s.dead_lettered} not written (dead-lettered or logged), "
            f"{counted(self.remaining, 'record')} left, {self.elapsed:.1f}s elapsed"
        )


class Replay:
    """Re-reads topics into an MLflow tracking URI.

    Args:
        config: Kafka settings and topics (its group id is not used: replay has its own).
        codec: decodes record values.
        writer: writes to the target MLflow.
        start_at: where to start reading.
        follow: keep running past the end offsets, as a daemon that never commits.
        dead_letter_topic: where refused records go; when None they are only logged.
        progress: draw a progress bar; None draws one when stderr is a terminal.
        retry_limit: seconds to keep retrying one batch before giving up.
    """

    def __init__(
        self,
        config: SinkConfig,
        codec: Codec,
        writer: MlflowWriter,
        start_at: StartAt,
        *,
        follow: bool = False,
        dead_letter_topic: str | None = None,
        progress: bool | None = None,
        retry_limit: float = 300.0,
    ) -> None:
        self.config = config
        self.start_at = start_at
        self.follow = follow
        self.retry_limit = retry_limit
        self.stats = SinkStats()
        self._stop = threading.Event()
        group = f"kafka-mlflow-sink-replay-{uuid.uuid4().hex[:12]}"
        self._settings = {**config.consumer_settings(), "group.id": group}
        dead_letters = None
        if dead_letter_topic:
            producer = Producer(config.producer_settings())
            dead_letters = DeadLetterWriter(producer, dead_letter_topic, group)
        self._applier = BatchApplier(codec, writer, dead_letters, self.stats)
        self._progress = sys.stderr.isatty() if progress is None else progress

    def stop(self) -> None:
        """Ask the replay to stop after the batch in flight; safe from a signal handler."""
        self._stop.set()

    def run(self) -> ReplayResult:
        """Read every partition up to its end offset at start (or forever with ``follow``).

        Raises:
            TransientWriteError: MLflow stayed unavailable for longer than ``retry_limit``.
        """
        reader = TopicReader(self._settings, self.config.topics, self.start_at, self.follow)
        total = reader.remaining
        logger.info(
            "replaying %s %s: %s in %d of %s%s",
            ", ".join(self.config.topics),
            self.start_at.describe(),
            counted(total, "record"),
            sum(1 for r in reader.ranges if not r.done),
            counted(len(reader.ranges), "partition"),
            ", then following all of them" if self.follow else "",
        )
        progress = _Progress(total, self._progress, self.config.stats_interval)
        try:
            for batch in reader.batches(self.config.batch_max_records, self.config.batch_max_wait):
                if self._stop.is_set():
                    break
                if not batch:
                    continue
                self._apply(batch)
                self.stats.records += len(batch)
                self.stats.batches += 1
                progress.update(self.stats, reader)
                if self._stop.is_set():
                    break
        except (ReplayInterrupted, Abandoned):
            pass
        finally:
            progress.close()
            self._applier.close()
            reader.close()
        return ReplayResult(
            self.stats, time.monotonic() - self.stats.started, reader.remaining, self._stop.is_set()
        )

    def _apply(self, batch: list[Message]) -> None:
        retrying = Retrying(
            retry=retry_if_exception(lambda e: isinstance(e, SinkError) and e.retriable),
            wait=backoff(self.config.retry_initial_wait, self.config.retry_max_wait),
            stop=stop_after_delay(self.retry_limit),
            sleep=self._sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        self.stats.dead_lettered += int(retrying(self._applier.apply, batch, self._check_stop))

    def _check_stop(self) -> None:
        """Between MLflow calls: a stop ends the batch now rather than after it."""
        if self._stop.is_set():
            raise Abandoned("stop requested")

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise ReplayInterrupted()


def _log_retry(state: RetryCallState) -> None:
    exc: Any = state.outcome.exception() if state.outcome else None
    level = logging.WARNING if state.attempt_number == 1 else logging.DEBUG
    logger.log(
        level, "MLflow write failed (%s); retrying with backoff", getattr(exc, "reason", exc)
    )


class _Progress:
    """A progress bar on a terminal; a log line every ``interval`` seconds elsewhere."""

    def __init__(self, total: int, bar: bool, interval: float) -> None:
        self._interval = interval
        self._last = time.monotonic()
        self._bar: Any = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="rec", dynamic_ncols=True, file=sys.stderr)

    def update(self, stats: SinkStats, reader: TopicReader) -> None:
        left = ", ".join(f"{r}:{r.remaining}" for r in reader.ranges if r.remaining)
        runs = stats.runs_created + stats.runs_found
        if self._bar is not None:
            self._bar.update(stats.records - self._bar.n)
            self._bar.set_postfix_str(f"runs={runs} points={stats.points} left[{left or '-'}]")
            return
        if time.monotonic() - self._last >= self._interval:
            self._last = time.monotonic()
            logger.info("replay progress: %s; remaining %s", stats.line(), left or "none")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
