"""What the Publisher refuses at the source, before anything reaches Kafka."""

from __future__ import annotations

import pytest

from kafka_mlflow_sink import Publisher


@pytest.fixture
def publisher() -> Publisher:
    # Nothing is sent in these tests: every call is refused before it reaches the producer.
    return Publisher("127.0.0.1:1", "refused")


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda p: p.log_params({"k" * 251: 1}), "longer than MLflow's 250 characters"),
        (lambda p: p.log_param("notes", "n" * 6001), "value of 6001 characters, over 6000"),
        (lambda p: p.log_metric("loss@peak", 1.0), "characters MLflow refuses"),
        (lambda p: p.set_tag("team", "t" * 8001), "value of 8001 characters, over .* 8000"),
        (lambda p: p.set_tag("kafka_mlflow_sink.run_key", "x"), "reserved .* the sink would"),
        (
            lambda p: p.begin_run(run_name="B", tags={"mlflow.runName": "other"}),
            "MLflow refuses to create such a run",
        ),
        (lambda p: p.set_tags({"../up": "x"}), "not a normalized relative path"),
        (lambda p: p.begin_run(tags={"": "empty key"}), "tag key is empty"),
    ],
)
def test_what_mlflow_would_refuse_is_refused_at_once(
    publisher: Publisher, call: object, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        call(publisher)  # type: ignore[operator]
    assert publisher.events_sent == 0
    publisher.close()


def test_a_published_run_shows_its_run_key_and_parent() -> None:
    from kafka_mlflow_sink.publisher import PublishedRun

    child = PublishedRun("k-2", "eval", "k-1")
    assert repr(child) == "PublishedRun(run_key='k-2', run_name='eval', parent_run_key='k-1')"
    assert repr(PublishedRun("k-1", None, None)) == "PublishedRun(run_key='k-1', run_name=None)"


class _UnacknowledgingProducer:
    """A producer whose broker never answers: every flush leaves its events waiting."""

    def __init__(self) -> None:
        self.flush_timeouts: list[float] = []
        self.values: list[bytes] = []

    def produce(self, topic: str, key: bytes, value: bytes, **kwargs: object) -> None:
        self.values.append(value)

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        self.flush_timeouts.append(timeout)
        return len(self.values)


def test_a_failed_flush_is_raised_once_without_waiting_for_it_again() -> None:
    """Leaving both blocks used to wait flush_timeout twice before the job heard of it."""
    from kafka_mlflow_sink.codec import BareCodec
    from kafka_mlflow_sink.errors import PublishError
    from kafka_mlflow_sink.events import RunFinished

    producer = _UnacknowledgingProducer()
    with pytest.raises(PublishError, match="still unacknowledged"):  # noqa: SIM117
        with Publisher("127.0.0.1:1", "t", flush_timeout=3.0) as pub:
            pub._producer = producer  # type: ignore[assignment]
            with pub.start_run("outer"), pub.start_run("inner", nested=True):
                pub.log_metric("loss", 1.0)
    assert producer.flush_timeouts == [3.0, 0]  # the inner run's flush, then no wait
    inner, outer = (BareCodec().decode(v, "t").payload for v in producer.values[-2:])
    assert isinstance(inner, RunFinished) and isinstance(outer, RunFinished)
    assert (inner.status, outer.status) == ("FINISHED", "FAILED")
