"""The local test stack is real: Kafka keeps messages and offsets, MLflow keeps runs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from localstack import KafkaBroker, MlflowServer, create_topic
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

pytestmark = pytest.mark.integration


def _produce(bootstrap_servers: str, topic: str, count: int, partition: int = 0) -> None:
    """Produce count keyed messages to one partition; fail unless every one is acknowledged."""
    errors: list[object] = []
    producer = Producer({"bootstrap.servers": bootstrap_servers, "enable.idempotence": True})
    for i in range(count):
        producer.produce(
            topic,
            key=f"k{i}",
            value=f"v{i}",
            partition=partition,
            on_delivery=lambda err, _msg: errors.append(err),
        )
    assert producer.flush(30) == 0
    assert errors == [None] * count


def _consumer(bootstrap_servers: str, group: str) -> Consumer:
    """A consumer with manual commits that starts at the beginning when it has no offset."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )


def _consume(consumer: Consumer, count: int, timeout: float = 30.0) -> list[Message]:
    """Consume exactly count messages or fail after timeout."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(messages) < count and time.monotonic() < deadline:
        for msg in consumer.consume(count - len(messages), timeout=1.0):
            assert msg.error() is None, msg.error()
            messages.append(msg)
    assert len(messages) == count
    return messages


def _committed(bootstrap_servers: str, group: str, partition: TopicPartition) -> int:
    """The offset a group has committed for one partition."""
    consumer = _consumer(bootstrap_servers, group)
    try:
        [result] = consumer.committed([partition], timeout=30)
        assert result.error is None
        offset: int = result.offset
        return offset
    finally:
        consumer.close()


def test_produce_and_consume_with_committed_offsets(
    kafka_bootstrap_servers: str, topic: Callable[..., str]
) -> None:
    name = topic()
    group = f"group-{uuid.uuid4().hex[:8]}"
    _produce(kafka_bootstrap_servers, name, 10)

    consumer = _consumer(kafka_bootstrap_servers, group)
    try:
        consumer.subscribe([name])
        messages = _consume(consumer, 10)
        last = messages[-1]
        consumer.commit(
            offsets=[TopicPartition(name, last.partition(), last.offset() + 1)],
            asynchronous=False,
        )
    finally:
        consumer.close()

    assert [m.value() for m in messages] == [f"v{i}".encode() for i in range(10)]
    assert _committed(kafka_bootstrap_servers, group, TopicPartition(name, 0)) == 10


def test_topic_factory_makes_partitions(
    kafka_bootstrap_servers: str, topic: Callable[..., str]
) -> None:
    name = topic(partitions=3)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap_servers})
    assert len(admin.list_topics(topic=name, timeout=10).topics[name].partitions) == 3


def test_broker_restart_keeps_topics_and_committed_offsets(kafka_broker: KafkaBroker) -> None:
    servers = kafka_broker.bootstrap_servers
    name = create_topic(servers, "restart", partitions=2)
    _produce(servers, name, 6)
    consumer = _consumer(servers, "restart-group")
    try:
        consumer.commit(offsets=[TopicPartition(name, 0, 3)], asynchronous=False)
    finally:
        consumer.close()

    kafka_broker.restart()

    admin = AdminClient({"bootstrap.servers": servers})
    assert len(admin.list_topics(topic=name, timeout=10).topics[name].partitions) == 2
    assert _committed(servers, "restart-group", TopicPartition(name, 0)) == 3
    consumer = _consumer(servers, "restart-group")
    try:
        consumer.assign([TopicPartition(name, 0, 3)])
        assert [m.value() for m in _consume(consumer, 3)] == [b"v3", b"v4", b"v5"]
    finally:
        consumer.close()


def test_mlflow_run_survives_server_restart(
    mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    experiment_id = client.create_experiment("restart")
    run_id = client.create_run(experiment_id, tags={"run_key": "r1"}).info.run_id
    client.log_param(run_id, "lr", "0.1")

    mlflow_server.stop()
    with pytest.raises(MlflowException):
        client.get_run(run_id)

    mlflow_server.start()
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1"}
    assert run.data.tags["run_key"] == "r1"


def test_mlflow_tracking_uri_stores_batches_and_artifacts(
    mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri=mlflow_tracking_uri)
    experiment_id = client.create_experiment(f"stack-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id).info.run_id
    metrics = [Metric("loss", 1.0 / (step + 1), 1_700_000_000_000, step) for step in range(5)]
    client.log_batch(run_id, metrics=metrics, params=[Param("epochs", "5")])
    note = tmp_path / "note.txt"
    note.write_text("hello")
    client.log_artifact(run_id, str(note))
    client.set_terminated(run_id)

    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(5))
    assert [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
    assert client.get_run(run_id).info.status == "FINISHED"
