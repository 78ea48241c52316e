"""Every error the sink raises, in one tree.

::

    SinkError
    ├── ConfigError              bad configuration; the CLI prints one line and exits 2
    ├── PublishError             the Publisher could not deliver events to Kafka
    ├── DecodeError              a record's bytes are not a valid run event (permanent)
    ├── RegistryUnavailable      the Schema Registry cannot be asked now (retried)
    ├── Abandoned                the batch in flight is dropped uncommitted (stop, rebalance)
    └── WriteError               MLflow refused or failed a write
        ├── TransientWriteError  worth retrying: MLflow down, slow, throttling, locked
        └── PermanentWriteError  retrying cannot help: the record goes to the dead-letter topic

Each class says whether retrying can help through ``retriable``; retry loops test that flag
and nothing else.
"""

from __future__ import annotations

import re


class SinkError(Exception):
    """Root of every error raised by kafka-mlflow-sink."""

    retriable: bool = False


class ConfigError(SinkError):
    """A configuration value is missing, malformed or unknown."""


class PublishError(SinkError):
    """Events could not be delivered to Kafka by the Publisher."""


class DecodeError(SinkError):
    """A record cannot be decoded into a run event; retrying will not change that."""


class RegistryUnavailable(SinkError):
    """The Schema Registry did not answer a schema lookup; the record may well be fine."""

    retriable = True


class WriteError(SinkError):
    """MLflow did not accept a write.

    Args:
        reason: one line saying what failed.
        run_key: the run the write was for, when known.
    """

    def __init__(self, reason: str, run_key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.run_key = run_key


class TransientWriteError(WriteError):
    """MLflow failed in a way that can pass: unreachable, 429/5xx, a locked database.

    ``ambiguous`` is True when MLflow answered with an error of its own (a 500) rather than
    being away or busy: the sink retries those too, but only for a while.
    """

    retriable = True
    ambiguous = False
    retry_after: float | None = None  # seconds MLflow asked the sink to wait (Retry-After)


class PermanentWriteError(WriteError):
    """MLflow rejected a write for good: a conflicting param, an invalid key, a deleted run."""


class Abandoned(SinkError):
    """The batch in flight is dropped uncommitted: a stop came, or partitions were revoked.

    Nothing of it is committed; whoever reads those partitions next writes it again.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or "" when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def describe(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for one-line error messages."""
    text = first_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def concise(text: str) -> str:
    """The part of an HTTP client's error that says what went wrong, without its wrapping.

    "API request to URL failed with exception HTTPConnectionPool(...): Max retries exceeded
    ... [Errno 111] Connection refused ..." becomes "API request to URL failed: Connection
    refused"; an HTML error page is named rather than quoted.
    """
    # SQLAlchemy appends the statement, its parameters and a link to its docs.
    text = re.sub(r"\s*\[SQL: .*", "", text, flags=re.DOTALL)
    html = re.search(r"<!doctype html|<html", text, re.IGNORECASE)
    if html:
        before = re.sub(r"\s*b?['\"]?$", "", text[: html.start()])
        text = before + " (an HTML page: is this the right URL?)"
    wrapped = re.match(r"API request to (\S+?) failed with (?:timeout )?exception (.*)", text)
    if not wrapped:
        return text
    url, rest = wrapped.groups()
    cause = re.search(r"\[Errno -?\d+\] ([^\"')\]]+)", rest) or re.search(
        r"Caused by \w+\('([^']+)'", rest
    )
    if cause:
        return f"API request to {url} failed: {cause.group(1).strip()}"
    if "timed out" in rest.lower():
        return f"API request to {url} failed: timed out"
    return text
