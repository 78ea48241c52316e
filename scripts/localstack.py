"""Real local services for development and tests: a Kafka broker from jars and an MLflow server.

No Docker needed. Kafka runs as a single-node KRaft broker (combined broker and controller)
from the Apache Kafka jars that Maven fetches once into ``.cache/kafka/libs``; MLflow runs as
``mlflow server`` from this virtualenv with a SQLite store and served artifacts.

Importable (``KafkaBroker``, ``MlflowServer``, ``ensure_kafka_jars``, ``create_topic``) and
runnable::

    python scripts/localstack.py fetch-jars
    python scripts/localstack.py kafka --workdir DIR    # prints KAFKA_BOOTSTRAP_SERVERS=...
    python scripts/localstack.py mlflow --workdir DIR   # prints MLFLOW_TRACKING_URI=...

The services run until SIGTERM or SIGINT. Only the standard library is needed; confluent-kafka
is used when installed, for a stronger readiness check and for ``create_topic``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger("localstack")

REPO = Path(__file__).resolve().parent.parent
POM = REPO / "broker" / "pom.xml"
KAFKA_CACHE = REPO / ".cache" / "kafka"
KAFKA_LIBS = KAFKA_CACHE / "libs"
JARS_MARKER = ".complete"
LOG_TAIL_LINES = 30
ERROR_MARKERS = re.compile(r"\b(ERROR|FATAL|Traceback)\b|Exception:|Error:")
STOP_TIMEOUT = 30.0
KAFKA_START_TIMEOUT = 60.0
MLFLOW_START_TIMEOUT = 90.0
DEFAULT_WORKDIR = REPO / ".cache" / "localstack"

LOG4J2_PROPERTIES = """\
status = warn
shutdownHook = disable
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


class ServiceError(RuntimeError):
    """A local service could not be prepared, started or stopped."""


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Tell whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def log_tail(*paths: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last error lines and the last lines of each existing file, headed by its path.

    Errors come first because a dying service logs its cause well before its last line.
    """
    parts = []
    for path in paths:
        if not path.exists():
            continue
        text = path.read_text(errors="replace").splitlines()
        errors = [line for line in text if ERROR_MARKERS.search(line)][-10:]
        if errors:
            parts.append(f"--- {path} (last {len(errors)} error lines)\n" + "\n".join(errors))
        tail = text[-lines:]
        parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts) or "(no log written)"


def _file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's content."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _find_executable(name: str, hint: str) -> str:
    """Return the path of an executable on PATH or fail with a hint."""
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"`{name}` not found on PATH: {hint}")
    return found


def _java() -> str:
    """Return the java executable, preferring JAVA_HOME."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return _find_executable("java", "install a Java 17+ runtime")


def _random_cluster_id() -> str:
    """Return a random Kafka cluster id (a base64url UUID without padding, like Uuid.toString)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


# ----------------------------------------------------------------------------- jars


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on path for the duration of the block (serialises processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_jars(libs: Path) -> None:
    """Run Maven to copy the broker and its runtime dependencies into libs."""
    mvn = _find_executable("mvn", "install Maven 3 to fetch the Kafka broker jars")
    cmd = [
        mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}", "-DincludeScope=runtime",
    ]  # fmt: skip
    log.info("fetching Kafka jars into %s", libs)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise ServiceError(f"mvn failed with exit code {result.returncode}:\n{output}")


def ensure_kafka_jars(libs: Path = KAFKA_LIBS) -> Path:
    """Fetch the Kafka broker jars once and return their directory.

    A marker holding the hash of ``broker/pom.xml`` is written after a complete download, so an
    interrupted download, or a changed pom, is redone from scratch.
    """
    marker = libs / JARS_MARKER
    wanted = _file_sha256(POM)
    with _file_lock(libs.parent / ".lock"):
        if marker.exists() and marker.read_text().strip() == wanted:
            return libs
        shutil.rmtree(libs, ignore_errors=True)
        libs.mkdir(parents=True)
        started = time.monotonic()
        _fetch_jars(libs)
        if not any(libs.glob("kafka_2.13-*.jar")):
            raise ServiceError(f"mvn finished but no kafka_2.13 jar is in {libs}")
        marker.write_text(wanted + "\n")
        log.info("Kafka jars ready in %.1f s", time.monotonic() - started)
    return libs


# ----------------------------------------------------------------------------- base service


class _Service:
    """A child process in its own process group, with a log file and a readiness check."""

    name = "service"
    start_timeout = 60.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        """The command line of the service (subclasses provide it)."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether the service answers clients yet (subclasses provide it)."""
        raise NotImplementedError

    def _log_files(self) -> tuple[Path, ...]:
        """Log files, the first one receiving stdout and stderr (subclasses provide them)."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create whatever the process needs before its first start."""

    def _env(self) -> dict[str, str]:
        """The environment of the process."""
        return dict(os.environ)

    @property
    def _stdout_file(self) -> Path:
        """Where the process's stdout and stderr go."""
        return self._log_files()[0]

    def is_running(self) -> bool:
        """Tell whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the process and return once it is ready; raise ServiceError otherwise."""
        if self.is_running():
            return
        begun = time.monotonic()
        self._prepare()
        started = time.monotonic()
        with self._stdout_file.open("ab") as out:
            self._proc = subprocess.Popen(
                self._command(), cwd=self.workdir, env=self._env(), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        log.info("%s ready in %.1f s", self.name, time.monotonic() - begun)

    def _wait_ready(self, started: float) -> None:
        """Poll the readiness check until it passes, the process dies, or time runs out."""
        assert self._proc is not None
        while time.monotonic() - started < self.start_timeout:
            code = self._proc.poll()
            if code is not None:
                raise self._failure(f"exited with code {code} during start-up")
            if self._ready():
                return
            time.sleep(0.2)
        raise self._failure(f"not ready after {self.start_timeout:.0f} s")

    def _failure(self, what: str) -> ServiceError:
        """Build an error that carries the tail of the service's logs."""
        return ServiceError(f"{self.name} {what}\n{log_tail(*self._log_files())}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Send SIGTERM to the process group, wait, and SIGKILL it after timeout."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %.0f s, killing it", self.name, timeout)
            self._signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        self._signal_group(proc.pid, signal.SIGKILL)  # any straggler of the group
        log.info("%s stopped", self.name)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        """Signal a process group that may already be gone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def restart(self) -> None:
        """Stop and start again with the same ports and the same stored data."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ----------------------------------------------------------------------------- Kafka


class KafkaBroker(_Service):
    """A single-node KRaft Kafka broker (broker and controller in one JVM) on 127.0.0.1.

    Every instance gets a fresh directory under ``workdir`` holding its configuration, storage
    and logs. ``restart()`` keeps ports and storage, so topics and committed offsets survive.
    """

    name = "kafka"
    start_timeout = KAFKA_START_TIMEOUT

    def __init__(self, workdir: Path, port: int | None = None, libs: Path | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(Path(tempfile.mkdtemp(prefix="kafka-", dir=workdir)))
        self.port = port or free_port()
        self.controller_port = free_port()
        self._libs = libs
        self._formatted = False

    @property
    def bootstrap_servers(self) -> str:
        """The address clients connect to, ``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    @property
    def storage_dir(self) -> Path:
        """The broker's log directory (topics, offsets and the KRaft metadata log)."""
        return self.workdir / "data"

    @property
    def _config_file(self) -> Path:
        return self.workdir / "server.properties"

    @property
    def _log4j_file(self) -> Path:
        return self.workdir / "log4j2.properties"

    def _log_files(self) -> tuple[Path, ...]:
        return (self.workdir / "broker.out", self.workdir / "broker.log")

    def _server_properties(self) -> str:
        """Render the broker configuration."""
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.storage_dir),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",  # one partition to warm up, see _ready()
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
        }
        return "".join(f"{key}={value}\n" for key, value in props.items())

    def _classpath(self) -> str:
        """Return the JVM class path of the broker jars, fetching them if needed."""
        if self._libs is None:
            self._libs = ensure_kafka_jars()
        return f"{self._libs}/*"

    def _prepare(self) -> None:
        """Write the configuration and format the storage, once per instance."""
        if self._formatted:
            return
        self._config_file.write_text(self._server_properties())
        self._log4j_file.write_text(LOG4J2_PROPERTIES.format(log_file=self._log_files()[1]))
        cmd = [
            _java(), "-cp", self._classpath(), f"-Dlog4j2.configurationFile={self._log4j_file}",
            "kafka.tools.StorageTool", "format", "-t", _random_cluster_id(),
            "-c", str(self._config_file),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ServiceError(f"kafka storage format failed:\n{result.stdout}{result.stderr}")
        self._formatted = True

    def _command(self) -> list[str]:
        return [
            _java(), "-Xmx512m", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._log4j_file}",
            "-cp", self._classpath(), "kafka.Kafka", str(self._config_file),
        ]  # fmt: skip

    def _ready(self) -> bool:
        """The port accepts connections and, with confluent-kafka, clients can work."""
        return port_open(self.port) and kafka_answers(self.bootstrap_servers)


def kafka_answers(bootstrap_servers: str) -> bool:
    """Tell whether metadata lists a broker and the group coordinator serves offset fetches.

    The first FindCoordinator request creates ``__consumer_offsets``; until its partition is
    loaded, commits fail with NOT_COORDINATOR, which librdkafka does not retry. Without
    confluent-kafka installed this returns True (the port check is all there is).
    """
    try:
        from confluent_kafka import Consumer, TopicPartition
        from confluent_kafka.admin import AdminClient
    except ImportError:
        return True
    config: dict[str, str | int | float | bool] = {"bootstrap.servers": bootstrap_servers}
    try:
        if not AdminClient(config).list_topics(timeout=5).brokers:
            return False
        consumer = Consumer({**config, "group.id": "localstack-ready"})
        try:
            consumer.committed([TopicPartition("__localstack_ready", 0)], timeout=5)
        finally:
            consumer.close()
    except Exception:  # KafkaException while the broker is still coming up
        return False
    return True


def _all_led(partitions: dict[int, Any], count: int) -> bool:
    """Tell whether a topic's metadata shows count partitions, each with a leader."""
    return len(partitions) == count and all(p.leader >= 0 for p in partitions.values())


def create_topic(
    bootstrap_servers: str, name: str, partitions: int = 1, timeout: float = 30.0
) -> str:
    """Create a topic with replication factor 1 and wait until every partition has a leader."""
    # NewTopic is documented under confluent_kafka.admin, but its stubs do not re-export it.
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.create_topics([NewTopic(name, partitions, 1)], operation_timeout=timeout)
    futures[name].result(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        topic = admin.list_topics(topic=name, timeout=timeout).topics.get(name)
        if topic is not None and topic.error is None and _all_led(topic.partitions, partitions):
            return name
        time.sleep(0.1)
    raise ServiceError(f"topic {name} has no leader for all partitions after {timeout:.0f} s")


# ----------------------------------------------------------------------------- MLflow


class MlflowServer(_Service):
    """``mlflow server`` on 127.0.0.1, by default with a SQLite store in ``workdir``, and served
    artifacts there; ``backend_store_uri`` picks another store (PostgreSQL for benchmarks).

    ``stop()`` and ``start()`` keep the port and the store, so a test can take MLflow down and
    bring the same server back.
    """

    name = "mlflow"
    start_timeout = MLFLOW_START_TIMEOUT

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        backend_store_uri: str | None = None,
        workers: int = 1,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir)
        self.port = port or free_port()
        self.backend_store_uri = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
        self.workers = workers

    @property
    def tracking_uri(self) -> str:
        """The URI MLflow clients use, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def _log_files(self) -> tuple[Path, ...]:
        return (self.workdir / "mlflow-server.log",)

    def _command(self) -> list[str]:
        mlflow = Path(sys.executable).parent / "mlflow"
        if not mlflow.exists():
            raise ServiceError(f"{mlflow} not found: install mlflow into this environment")
        return [
            str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.workdir / "artifacts"),
            "--workers", str(self.workers),
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The job runner adds seven huey worker processes and a temp dir in /dev/shm per start.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        return env

    def _ready(self) -> bool:
        """GET /health answers 200."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.tracking_uri}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


# ----------------------------------------------------------------------------- CLI


def _serve(service: _Service, line: Callable[[], str]) -> int:
    """Start a service, print its address line, and run until SIGTERM/SIGINT or its death."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    with service:
        print(line(), flush=True)
        while not stop.wait(1.0):
            if not service.is_running():
                log.error("%s", service._failure("exited unexpectedly"))
                return 1
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch-jars", help="download the Kafka broker jars into .cache/kafka")
    for name in ("kafka", "mlflow"):
        sub = commands.add_parser(name, help=f"run a local {name} until SIGTERM/SIGINT")
        sub.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR / name)
        sub.add_argument("--port", type=int, default=None, help="default: a free port")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python scripts/localstack.py``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = _parse_args(argv)
    try:
        if args.command == "fetch-jars":
            log.info("Kafka jars in %s", ensure_kafka_jars())
            return 0
        if args.command == "kafka":
            broker = KafkaBroker(args.workdir.resolve(), port=args.port)
            return _serve(broker, lambda: f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}")
        server = MlflowServer(args.workdir.resolve(), port=args.port)
        return _serve(server, lambda: f"MLFLOW_TRACKING_URI={server.tracking_uri}")
    except ServiceError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
