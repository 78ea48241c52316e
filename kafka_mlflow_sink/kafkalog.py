"""librdkafka's log lines, routed through Python logging without flooding it.

librdkafka logs every failed connection attempt, several a second while a broker is away.
The filter here lets one line of each kind through per minute and demotes the lines of
things librdkafka retries by itself (a coordinator still loading, say) to DEBUG: they are
routine, and a failure that lasts shows up in the sink's own lines. It adds no handler:
where the lines go is the application's choice (the Publisher is a library and configures
no logging).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException

REPEAT_WINDOW = 60.0
_NUMBERS = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    """Drops a line seen in the last ``window`` seconds; demotes self-retried trouble."""

    # Lines librdkafka writes about trouble it retries by itself.
    SELF_RETRIED = "retrying"

    def __init__(self, window: float = REPEAT_WINDOW) -> None:
        super().__init__()
        self._window = window
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        shape = _NUMBERS.sub("#", text)
        now = time.monotonic()
        if now - self._seen.get(shape, -self._window) < self._window:
            return False
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[shape] = now
        if self.SELF_RETRIED in text and record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


LIBRDKAFKA_LOGGER = logging.getLogger("kafka_mlflow_sink.librdkafka")
LIBRDKAFKA_LOGGER.addFilter(RepeatFilter())

# For short-lived clients whose failure the caller reports itself in one line (start-up
# checks, `lag`): their librdkafka lines would only repeat it.
QUIET_LOGGER = logging.getLogger("kafka_mlflow_sink.librdkafka.checks")
QUIET_LOGGER.addHandler(logging.NullHandler())
QUIET_LOGGER.propagate = False


def describe_kafka_error(exc: KafkaException | KafkaError | Any) -> str:
    """One readable line for a Kafka error."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else exc
    return err.str() if isinstance(err, KafkaError) else str(err)
