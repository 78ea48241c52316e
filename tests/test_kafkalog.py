"""The filter between librdkafka's log lines and the user's terminal."""

from __future__ import annotations

import logging

import pytest

from kafka_mlflow_sink.kafkalog import RepeatFilter

NAME = "kafka_mlflow_sink.librdkafka.test"


def line(text: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(NAME, level, __file__, 1, text, None, None)


def test_a_line_repeated_within_the_window_is_dropped_whatever_its_numbers() -> None:
    repeats = RepeatFilter(window=60)
    assert repeats.filter(line("Connect to 127.0.0.1:9092 failed: Connection refused (after 0ms)"))
    assert not repeats.filter(
        line("Connect to 127.0.0.1:9092 failed: Connection refused (after 3ms)")
    )
    assert repeats.filter(line("Metadata request timed out"))


def test_a_line_passes_again_once_its_window_is_over() -> None:
    repeats = RepeatFilter(window=0)
    assert repeats.filter(line("Broker transport failure"))
    assert repeats.filter(line("Broker transport failure"))


@pytest.mark.parametrize(("enabled", "shown"), [(logging.INFO, False), (logging.DEBUG, True)])
def test_trouble_librdkafka_retries_by_itself_is_debug(enabled: int, shown: bool) -> None:
    logging.getLogger(NAME).setLevel(enabled)
    try:
        record = line(
            "Failed to acquire idempotence PID from broker: Coordinator load in progress: retrying",
            logging.INFO,
        )
        assert RepeatFilter().filter(record) is shown
        assert record.levelname == "DEBUG"
    finally:
        logging.getLogger(NAME).setLevel(logging.NOTSET)
