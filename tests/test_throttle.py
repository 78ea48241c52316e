"""Reading a throttling server's Retry-After, and waiting at least that long."""

from __future__ import annotations

import email.utils

import pytest
from tenacity import RetryCallState, Retrying

from kafka_mlflow_sink.errors import Abandoned, TransientWriteError
from kafka_mlflow_sink.throttle import (
    RETRY_AFTER_CAP,
    ThrottledResponse,
    answer_detail,
    backoff,
    parse_retry_after,
)
from kafka_mlflow_sink.writer import _most_telling, classify

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        (" 0 ", 0.0),
        (email.utils.formatdate(NOW + 42, usegmt=True), 42.0),
        (email.utils.formatdate(NOW - 42, usegmt=True), 0.0),  # already past
        (None, None),
        ("", None),
        ("-3", None),
        ("soon", None),
        ("1.5", None),  # delay-seconds are whole numbers
        ("\u00b2", None),  # a digit to str.isdigit, not to float
        ("999999999", RETRY_AFTER_CAP),
        (email.utils.formatdate(NOW + 10**9, usegmt=True), RETRY_AFTER_CAP),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


def waited(outcome: BaseException, initial: float = 0.5, maximum: float = 30.0) -> float:
    state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    state.set_exception((type(outcome), outcome, None))
    return backoff(initial, maximum)(state)


def test_backoff_waits_at_least_what_mlflow_asked_for() -> None:
    throttled = classify(ThrottledResponse(429, 12.0), "log_batch", "r")
    assert isinstance(throttled, TransientWriteError) and not throttled.ambiguous
    assert throttled.retry_after == 12.0
    assert "MLflow is busy (HTTP 429, Retry-After 12s)" in throttled.reason
    assert all(12.0 <= waited(throttled) <= 30.0 for _ in range(20))


def test_a_huge_retry_after_is_capped_and_a_missing_one_leaves_plain_backoff() -> None:
    greedy = classify(ThrottledResponse(503, 86_400.0), "log_batch")
    assert waited(greedy) == RETRY_AFTER_CAP
    silent = classify(ThrottledResponse(503, None), "log_batch")
    assert silent.retry_after is None and "Retry-After" not in silent.reason
    assert all(0 <= waited(silent, 0.5, 2.0) <= 2.0 for _ in range(20))


def test_of_throttled_answers_given_at_once_the_longest_pause_is_honoured() -> None:
    # Writer threads of one batch can be throttled by the same burst of answers.
    stopped = Abandoned("another part of the batch failed")
    short = classify(ThrottledResponse(429, 2.0), "log_batch", "a")
    long = classify(ThrottledResponse(503, 3.0), "log_batch", "b")
    silent = classify(ThrottledResponse(429, None), "log_batch", "c")
    assert _most_telling([stopped, short, silent, long]) is long
    assert waited(_most_telling([short, stopped, long])) >= 3.0
    assert _most_telling([stopped, silent]) is silent
    assert _most_telling([stopped]) is stopped


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            '{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "database is locked"}',
            "TEMPORARILY_UNAVAILABLE: database is locked",
        ),
        ("<html>\n  Too Many Requests\n</html>", "<html> Too Many Requests </html>"),
        ("", ""),
    ],
)
def test_a_busy_answer_says_what_the_server_said(body: str, detail: str) -> None:
    assert answer_detail(body) == detail
