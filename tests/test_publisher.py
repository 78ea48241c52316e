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
