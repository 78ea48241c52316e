"""Throttling answers from an MLflow server: the Retry-After of a 429 or a 503.

The sink turns MLflow's own HTTP retries off, so that they never stack with its own backoff
into calls that block for minutes. With retries off, MLflow's HTTP layer turns a 429 or 503
into an exception that no longer carries the response, so the ``Retry-After`` header a
throttling server (or a gateway in front of it) sends would be lost. The writer therefore
sends ``log-batch`` calls, nearly all of the sink's traffic, through MLflow's REST helper
with no status treated as retryable, and reads the answer itself: a throttling answer
becomes ``ThrottledResponse`` and the sink's backoff waits at least as long as asked. Other
calls that meet a 429 or 503 back off exponentially.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import RetryCallState, wait_random_exponential

THROTTLING_STATUSES = frozenset({429, 503})
# A server asking for a longer pause gets this one: the sink checks on it at least this often.
RETRY_AFTER_CAP = 300.0


@dataclass(frozen=True)
class Throttled:
    """MLflow answered 429 or 503; ``retry_after`` is its requested pause in seconds."""

    status: int
    retry_after: float | None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date.

    Returns None for a missing or unreadable header; a date in the past means 0, and no
    answer is longer than ``RETRY_AFTER_CAP``.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # "²".isdigit() is true too
        return min(float(text), RETRY_AFTER_CAP)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT; a zone-less one is read as such
        return None
    seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, seconds), RETRY_AFTER_CAP) if math.isfinite(seconds) else None


class ThrottledResponse(Exception):
    """MLflow answered a call with 429 or 503."""

    def __init__(self, status: int, retry_after: float | None, detail: str = "") -> None:
        pause = "" if retry_after is None else f", Retry-After {retry_after:g}s"
        said = f": {detail}" if detail else ""
        super().__init__(f"MLflow is busy (HTTP {status}{pause}){said}")
        self.throttled = Throttled(status, retry_after)


def answer_detail(body: str) -> str:
    """One line from an error answer's body: MLflow's error code and message when it is JSON."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and ("message" in parsed or "error_code" in parsed):
        code = parsed.get("error_code")
        text = f"{code}: {parsed.get('message', '')}" if code else str(parsed.get("message"))
    else:
        text = body
    return " ".join(text.split())[:200]


def backoff(initial: float, maximum: float) -> Callable[[RetryCallState], float]:
    """Random exponential backoff between retries, but never shorter than MLflow asked for.

    Args:
        initial: the first wait's scale, in seconds.
        maximum: the longest wait backoff alone makes; a Retry-After may ask for more, up to
            ``RETRY_AFTER_CAP``.
    """
    exponential = wait_random_exponential(multiplier=initial, max=maximum)

    def wait(state: RetryCallState) -> float:
        base: float = exponential(state)
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None)
        return base if asked is None else max(base, min(float(asked), RETRY_AFTER_CAP))

    return wait
