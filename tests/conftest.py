"""Fixtures for real Kafka and MLflow services.

Kafka is found in this order: ``KAFKA_BOOTSTRAP_SERVERS`` from the environment, a testcontainers
broker when a Docker engine answers, then a broker from the local jars (scripts/localstack.py).
MLflow likewise: ``MLFLOW_TRACKING_URI``, then MLflow's image through testcontainers, then a
local ``mlflow server``. Tests that stop and restart a service always use local ones.
Services start only when a test asks for them, so ``pytest -m "not integration"`` starts none.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from localstack import KafkaBroker, MlflowServer, create_topic

from tests.support import SOAK_FIGURES, TALLY_DIR, SinkProcess

log = logging.getLogger(__name__)


def pytest_sessionstart(session: pytest.Session) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ:  # workers share the controller's directory
        for old in [*TALLY_DIR.glob("*.json"), SOAK_FIGURES]:
            old.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The reliability scenarios of this session as one table: where every record went."""
    if "PYTEST_XDIST_WORKER" in os.environ or not TALLY_DIR.is_dir():
        return
    rows = [json.loads(f.read_text()) for f in TALLY_DIR.glob("*.json")]
    rows.sort(key=lambda row: str(row["scenario"]))
    if not rows:
        return
    write = terminalreporter.write_line
    terminalreporter.section("reliability scenarios: where every record went")
    write(f"{'scenario':<58} {'in':>7} {'MLflow':>7} {'DLQ':>5} {'lost':>5} {'dup':>5}")
    for row in rows:
        write(
            f"{row['scenario'][:58]:<58} {row['records_in']:>7} {row['in_mlflow']:>7} "
            f"{row['dead_lettered']:>5} {row['lost']:>5} {row['duplicated']:>5}"
        )
    if SOAK_FIGURES.is_file():
        write(
            "soak: {seconds} s, {events} events, {runs} runs; sink RSS {rss_mb_first} MB at "
            "start, {rss_mb_warm} MB warmed up, {rss_mb_end} MB at the end (max {rss_mb_max}); "
            "lag at most {max_lag_during_load} during load, {lag_at_stop} at stop, "
            "0 after {seconds_to_zero_lag} s".format(**json.loads(SOAK_FIGURES.read_text()))
        )


def _docker_answers() -> bool:
    """Tell quickly and quietly whether a Docker engine answers a ping."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a failed ping leaves an unclosed socket behind
        try:
            import docker

            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False


def _testcontainers_kafka() -> Iterator[str]:
    """Run a Kafka container for the session and yield its bootstrap address."""
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers < 4.10
        from testcontainers.kafka import KafkaContainer

    with KafkaContainer().with_kraft() as container:
        yield container.get_bootstrap_server()


@pytest.fixture(scope="session")
def kafka_bootstrap_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of the session's Kafka broker."""
    if address := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield address
    elif _docker_answers():
        yield from _testcontainers_kafka()
    else:
        with KafkaBroker(tmp_path_factory.mktemp("kafka")) as broker:
            yield broker.bootstrap_servers


def _testcontainers_mlflow() -> Iterator[str]:
    """Run MLflow's own image for the session, the same version as the client, and yield it."""
    import mlflow
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    image = f"ghcr.io/mlflow/mlflow:v{mlflow.__version__}"
    command = "mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db"
    with DockerContainer(image).with_command(command).with_exposed_ports(5000) as container:
        wait_for_logs(container, "Uvicorn running|Listening at", timeout=120)
        yield f"http://{container.get_container_host_ip()}:{container.get_exposed_port(5000)}"


@pytest.fixture(scope="session")
def mlflow_tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of the session's MLflow server."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        yield uri
    elif _docker_answers():
        yield from _testcontainers_mlflow()
    else:
        with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
            yield server.tracking_uri


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A local MLflow server of this test's own, which the test may stop and start again."""
    with MlflowServer(tmp_path / "mlflow") as server:
        yield server


@pytest.fixture
def kafka_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A local Kafka broker of this test's own, which the test may stop and restart."""
    with KafkaBroker(tmp_path / "kafka") as broker:
        yield broker


@pytest.fixture
def topic(kafka_bootstrap_servers: str) -> Callable[..., str]:
    """Factory: ``topic(partitions=1, prefix="test")`` creates a fresh topic, returns its name."""

    def make(partitions: int = 1, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        return create_topic(kafka_bootstrap_servers, name, partitions)

    return make


@pytest.fixture
def start_sink(tmp_path: Path) -> Iterator[Callable[..., SinkProcess]]:
    """Factory for sink daemons; each still running must stop cleanly (exit 0) on SIGTERM."""
    sinks: list[SinkProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> SinkProcess:
        sink = SinkProcess(tmp_path / f"sink-{len(sinks)}.log", *args, env=env)
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        if sink.process.poll() is None:  # a test may have killed it on purpose
            assert sink.stop() == 0, sink.log()
