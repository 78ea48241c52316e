"""Command line of the sink daemon: ``kafka-mlflow-sink run`` and operator helpers.

Every failure the user can fix (bad settings, unreachable broker or MLflow, missing topic)
ends with one line on stderr and a non-zero exit code, never a stack trace.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar

import click
from confluent_kafka import KafkaError, KafkaException

from kafka_mlflow_sink import __version__
from kafka_mlflow_sink.config import SinkConfig, parse_pairs, redact_uri, to_toml
from kafka_mlflow_sink.errors import ConfigError, SinkError, first_line
from kafka_mlflow_sink.kafkalog import describe_kafka_error

logger = logging.getLogger("kafka_mlflow_sink")

F = TypeVar("F", bound=Callable[..., Any])
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130
EXIT_UNEXPECTED = 1
ENV_PREFIX = "KAFKA_MLFLOW_SINK_"


class Failure(SinkError):
    """A start-up check failed; the message is the one line the user sees."""


def _kafka_options(fn: F) -> F:
    options = [
        click.option(
            "--bootstrap-servers",
            "-b",
            envvar=["KAFKA_MLFLOW_SINK_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"],
            help="Kafka brokers, host:port[,host:port].",
        ),
        click.option(
            "--kafka",
            "kafka_pairs",
            multiple=True,
            metavar="KEY=VALUE",
            help="Extra librdkafka setting (security.protocol, sasl.*, ssl.*); repeatable.",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar=ENV_PREFIX + "CONFIG",
            help="TOML file with settings; flags and environment variables win over it.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kafka-mlflow-sink")
def cli() -> None:
    """Kafka as the transport for MLflow experiment tracking.

    Training jobs publish run events to a Kafka topic; `run` writes them into MLflow and
    commits offsets only after MLflow accepted the writes.
    """


_topics_option = click.option(
    "--topic",
    "-t",
    "topics",
    multiple=True,
    envvar=ENV_PREFIX + "TOPICS",
    help="Topic of run events; repeatable. [default: mlflow-events]",
)
_writers_option = click.option(
    "--writers",
    type=click.IntRange(0, 64),
    envvar=ENV_PREFIX + "WRITERS",
    help="Runs written to MLflow at once; 0 picks for the store. "
    "[default: 0, which is 4 through a tracking server, else 1]",
)
_dead_letter_option = click.option(
    "--dead-letter-topic",
    envvar=ENV_PREFIX + "DEAD_LETTER_TOPIC",
    help="Topic for records that can never be written. [default: <first topic>.dlq]",
)


def _source_options(fn: F) -> F:
    """Topics and how their records are framed."""
    options = [
        _topics_option,
        click.option(
            "--framing",
            type=click.Choice(["bare", "registry"]),
            envvar=ENV_PREFIX + "FRAMING",
            help="Bare Avro, or the Schema Registry wire format. [default: bare]",
        ),
        click.option(
            "--schema-registry-url",
            envvar=ENV_PREFIX + "SCHEMA_REGISTRY_URL",
            help="Schema Registry, for --framing registry.",
        ),
        click.option(
            "--tracking-uri",
            envvar=["KAFKA_MLFLOW_SINK_TRACKING_URI", "MLFLOW_TRACKING_URI"],
            help="MLflow tracking URI. [default: MLflow's own, sqlite:///mlflow.db]",
        ),
        click.option(
            "--log-level",
            default="info",
            envvar=ENV_PREFIX + "LOG_LEVEL",
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            show_default=True,
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command()
@_kafka_options
@_source_options
@click.option(
    "--group-id",
    "-g",
    envvar=ENV_PREFIX + "GROUP_ID",
    help="Consumer group. [default: kafka-mlflow-sink]",
)
@_dead_letter_option
@click.option(
    "--batch-max-records",
    type=int,
    envvar=ENV_PREFIX + "BATCH_MAX_RECORDS",
    help="Most records in one batch. [default: 5000]",
)
@click.option(
    "--batch-max-wait",
    type=float,
    envvar=ENV_PREFIX + "BATCH_MAX_WAIT",
    help="Seconds to wait for a batch to fill. [default: 0.25]",
)
@click.option(
    "--stats-interval",
    type=float,
    envvar=ENV_PREFIX + "STATS_INTERVAL",
    help="Seconds between progress lines. [default: 60]",
)
@_writers_option
@click.option("--print-config", is_flag=True, help="Print the effective settings and exit.")
def run(
    config_file: Path | None,
    kafka_pairs: tuple[str, ...],
    log_level: str,
    print_config: bool,
    **flags: Any,
) -> None:
    """The daemon: write run events into MLflow, commit after each write.

    Runs until SIGTERM or SIGINT, then finishes or abandons the batch in flight, commits
    what was written, leaves the consumer group and exits 0.
    """
    _setup_logging(log_level)
    config = _guard(lambda: _load_config(config_file, kafka_pairs, flags))
    if print_config:
        threads = config.writer_threads()
        notes = {} if config.writers else {"writers": f"0 writes {threads} run(s) at once here"}
        click.echo(to_toml(config.redacted(), notes))
        return
    _guard(lambda: _run_sink(config))


@cli.command()
@_kafka_options
@_topics_option
@click.option(
    "--group-id",
    "-g",
    envvar=ENV_PREFIX + "GROUP_ID",
    help="Consumer group to inspect. [default: kafka-mlflow-sink]",
)
@click.option(
    "--wait",
    type=float,
    default=0.0,
    metavar="SECONDS",
    help="Wait up to SECONDS for the lag to reach 0.",
)
def lag(config_file: Path | None, kafka_pairs: tuple[str, ...], wait: float, **flags: Any) -> None:
    """Show a group's committed offsets against the topics' end offsets.

    Exits 0 when the group has committed everything, 1 when it lags.
    """
    from kafka_mlflow_sink.offsets import group_lag

    settings = _guard(lambda: _load_config(config_file, kafka_pairs, flags))
    deadline = time.monotonic() + wait
    while True:
        rows = _guard(lambda: group_lag(settings))
        total = sum(r.lag for r in rows)
        if total == 0 or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    for row in rows:
        committed = row.committed if row.committed >= 0 else "none"
        click.echo(
            f"{row.topic}[{row.partition}] committed={committed} end={row.end} lag={row.lag}"
        )
    click.echo(f"total lag {total}")
    if rows and all(row.committed < 0 for row in rows):
        click.echo(
            f"group {settings.group_id!r} has committed nothing on these topics "
            "(a new group, or a misspelt one?)"
        )
    sys.exit(0 if total == 0 else 1)


@cli.command()
@_kafka_options
@_source_options
@click.option(
    "--from-timestamp",
    metavar="TIME",
    help="Start at this time: ISO 8601 with a zone, or epoch milliseconds.",
)
@click.option(
    "--from-offsets",
    multiple=True,
    metavar="TOPIC:PARTITION=OFFSET",
    help="Start at these offsets (comma-separated or repeated); partitions not named are not read.",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Keep running past the end offsets, like the daemon but never committing.",
)
@click.option(
    "--dead-letter-topic",
    help="Send records that can never be written here. [default: only log them]",
)
@click.option("--batch-max-records", type=int, help="Most records in one batch. [default: 5000]")
@_writers_option
@click.option(
    "--retry-limit",
    type=float,
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="Give up when MLflow fails a batch for this long.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar. [default: when stderr is a terminal]",
)
def replay(
    config_file: Path | None,
    kafka_pairs: tuple[str, ...],
    log_level: str,
    from_timestamp: str | None,
    from_offsets: tuple[str, ...],
    follow: bool,
    dead_letter_topic: str | None,
    retry_limit: float,
    progress: bool | None,
    **flags: Any,
) -> None:
    """Rebuild MLflow from topics, from any point.

    Reads with manual assignment and never commits, so the live sink's consumer group is not
    disturbed. Stops once every partition reached the end offset it had when the replay
    started, unless --follow. Replaying again changes nothing: runs are found by run key and
    what MLflow holds is skipped.
    """
    from kafka_mlflow_sink.reader import StartAt, parse_offsets, parse_timestamp

    _setup_logging(log_level)
    config = _guard(lambda: _load_config(config_file, kafka_pairs, flags))
    if from_timestamp and from_offsets:
        _fail("configuration: give --from-timestamp or --from-offsets, not both", EXIT_CONFIG)
    start_at = _guard(
        lambda: StartAt(
            timestamp_ms=parse_timestamp(from_timestamp) if from_timestamp else None,
            offsets=parse_offsets(from_offsets),
        )
    )
    result = _guard(
        lambda: _run_replay(config, start_at, follow, dead_letter_topic, retry_limit, progress)
    )
    click.echo(result.summary(), err=True)
    # With --follow a stop is how the replay ends; without, it left records unread.
    sys.exit(EXIT_INTERRUPTED if result.interrupted and not follow else 0)


@cli.command()
@_kafka_options
@_source_options
def verify(
    config_file: Path | None, kafka_pairs: tuple[str, ...], log_level: str, **flags: Any
) -> None:
    """Report, per run, what MLflow lacks compared with the topics.

    Exits 0 only when MLflow holds everything the topics say.
    """
    _import_mlflow()
    from kafka_mlflow_sink.codec import make_codec
    from kafka_mlflow_sink.verify import describe, differences, read_mlflow, read_topic
    from kafka_mlflow_sink.writer import MlflowWriter, check_mlflow

    _setup_logging(log_level)
    _mlflow_environment()
    config = _guard(lambda: _load_config(config_file, kafka_pairs, flags))
    _refuse_missing_sqlite(config.tracking_uri)
    codec = _guard(lambda: make_codec(config.framing, config.schema_registry_url))
    topic = _guard(lambda: read_topic(config.consumer_settings(), config.topics, codec))
    writer = _guard(lambda: MlflowWriter(config.tracking_uri))
    _guard(lambda: check_mlflow(writer))
    report = _guard(lambda: differences(topic.runs, read_mlflow(writer.client, topic.runs)))
    for line in describe(topic.runs, report):
        click.echo(line)
    if topic.undecodable:
        click.echo(
            f"{topic.undecodable} of {topic.records} records could not be decoded "
            "(not expected in MLflow)"
        )
    if topic.refused:
        click.echo(
            f"{topic.refused} of {topic.records} records hold what MLflow refuses (a changed "
            "param, a bad key, an over-long value): dead-lettered, not expected in MLflow"
        )
    sys.exit(1 if report else 0)


@cli.command("create-topics")
@_kafka_options
@_topics_option
@_dead_letter_option
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=6,
    show_default=True,
    help="Partitions: the most sink instances that can share the work.",
)
@click.option("--replication-factor", type=click.IntRange(min=1), default=1, show_default=True)
def create_topics(
    config_file: Path | None,
    kafka_pairs: tuple[str, ...],
    partitions: int,
    replication_factor: int,
    **flags: Any,
) -> None:
    """Create the run-events topics and the dead-letter topic (existing ones are kept)."""
    from kafka_mlflow_sink.offsets import create_topics as create

    config = _guard(lambda: _load_config(config_file, kafka_pairs, flags))
    outcome = _guard(lambda: create(config, partitions, replication_factor))
    for topic in [*config.topics, config.dead_letter_topic]:
        click.echo(f"{topic}: {outcome[topic]}")


def main() -> None:
    """Console-script entry point."""
    _keep_pandas_out()
    cli(prog_name="kafka-mlflow-sink")


def _keep_pandas_out() -> None:
    """Mark pandas as missing in this process, so that MLflow does not import it.

    MLflow imports pandas (46 MB of memory) only to offer its pandas dataset flavour, and
    leaves that flavour out when pandas is not installed, as with ``mlflow-skinny``. The
    sink never builds a DataFrame: the MLflow calls it makes take and return entities.
    Only the command's own process is affected, never a training job's, where the
    Publisher runs; ``_import_mlflow`` lets pandas back in should MLflow need it after all.
    """
    if "pandas" not in sys.modules:
        sys.modules["pandas"] = None  # type: ignore[assignment]


def _import_mlflow(module: str = "mlflow") -> None:
    """Import MLflow, with pandas after all if this MLflow cannot do without it."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        kept_out = "pandas" in sys.modules and sys.modules["pandas"] is None
        if exc.name != "pandas" or not kept_out:
            raise
        del sys.modules["pandas"]
        logger.debug("MLflow needs pandas here (%s); importing it", exc)
        importlib.import_module(module)


# -- helpers ------------------------------------------------------------------------------

T = TypeVar("T")


def _guard(action: Callable[[], T]) -> T:
    """Run ``action``; turn every error into one line and an exit code.

    The stack trace of an unexpected error goes to the log at DEBUG, not to the user.
    """
    try:
        return action()
    except ConfigError as exc:
        _fail(f"configuration: {exc}", EXIT_CONFIG)
    except SinkError as exc:
        _fail(str(exc), EXIT_UNAVAILABLE)
    except KafkaException as exc:
        text = describe_kafka_error(exc)
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() == KafkaError._INVALID_ARG:
            _fail(f"configuration: Kafka setting refused: {text}", EXIT_CONFIG)
        _fail(f"Kafka: {text}", EXIT_UNAVAILABLE)
    except Exception as exc:
        logger.debug("unexpected error", exc_info=True)
        _fail(
            f"unexpected {type(exc).__name__}: {redact_uri(first_line(exc))[:300]} "
            "(--log-level debug shows where)",
            EXIT_UNEXPECTED,
        )


def _fail(message: str, code: int) -> NoReturn:
    # Settings are quoted back in errors; a URI among them may hold a secret.
    click.echo(f"kafka-mlflow-sink: error: {redact_uri(message)}", err=True)
    sys.exit(code)


def _load_config(
    config_file: Path | None, kafka_pairs: tuple[str, ...], flags: dict[str, Any]
) -> SinkConfig:
    values: dict[str, Any] = {}
    if config_file is not None:
        values = _read_toml(config_file)
    from_file = values.pop("kafka", {})
    if not isinstance(from_file, dict):
        raise ConfigError(f"kafka must be a table of librdkafka settings, not {from_file!r}")
    for key, value in from_file.items():
        # librdkafka takes strings; a TOML date or list would be passed on as its repr.
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"kafka setting {key!r} must be a string or a number, not {value!r}")
    kafka = {**from_file, **parse_pairs(kafka_pairs, "--kafka")}
    given = {k: v for k, v in flags.items() if v not in (None, ())}
    values.update(given)
    topics = values.get("topics") or ("mlflow-events",)
    if isinstance(topics, str):
        topics = (topics,)
    if not isinstance(topics, list | tuple) or not all(isinstance(t, str) for t in topics):
        raise ConfigError(f"topics must be a list of topic names, not {topics!r}")
    # Flags repeat, the environment and TOML may list several topics with commas.
    values["topics"] = tuple(t.strip() for item in topics for t in item.split(",") if t.strip())
    values["kafka"] = {
        str(k): ("true" if v else "false") if isinstance(v, bool) else str(v)
        for k, v in kafka.items()
    }
    return SinkConfig.from_mapping(values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "mlflow", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # MLflow's SQL store logs each database error it raises with a stack trace; the sink
    # reports every one itself, in one line that says what happens next.
    debug = level.lower() == "debug"
    logging.getLogger("mlflow.store.db.utils").setLevel(
        logging.DEBUG if debug else logging.CRITICAL
    )


def _refuse_missing_sqlite(tracking_uri: str | None) -> None:
    """Reading must not create a store: MLflow would make an empty SQLite file."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        _fail(f"no MLflow store at {uri}", EXIT_UNAVAILABLE)


def _warn_unused(config: SinkConfig) -> None:
    if config.schema_registry_url and config.framing == "bare":
        logger.warning(
            "a Schema Registry URL is set but framing is 'bare': records are read with the "
            "bundled schema and the registry is not used (add --framing registry to use it)"
        )


def _mlflow_environment() -> None:
    # MLflow's HTTP client retries 429/5xx up to 7 times with long backoff by default; the
    # sink retries whole batches itself, so let each call fail fast instead of stacking.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # A daemon's output is its log: no "View run at" lines on stdout, no INFO chatter.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _freeze_start_up_objects() -> None:
    """Keep what start-up built out of the garbage collector's full passes.

    Importing MLflow leaves some 300,000 objects that live as long as the process; every
    full collection walked them all again (80 ms each, in the middle of writing a batch).
    """
    gc.collect()
    gc.freeze()


def _on_stop_signals(
    stop: Callable[[], None], doing: str = "finishing the batch in flight, then stopping"
) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        logger.info("%s received: %s", name, doing)
        stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _run_replay(
    config: SinkConfig,
    start_at: Any,
    follow: bool,
    dead_letter_topic: str | None,
    retry_limit: float,
    progress: bool | None,
) -> Any:
    _mlflow_environment()
    _import_mlflow()
    from kafka_mlflow_sink.codec import check_registry, make_codec
    from kafka_mlflow_sink.replay import Replay
    from kafka_mlflow_sink.writer import MlflowWriter, check_mlflow

    writer = MlflowWriter(config.tracking_uri, parallelism=config.writer_threads())
    check_mlflow(writer)
    codec = make_codec(config.framing, config.schema_registry_url)
    check_registry(codec, config.schema_registry_url)
    _warn_unused(config)
    job = Replay(
        config,
        codec,
        writer,
        start_at,
        follow=follow,
        dead_letter_topic=dead_letter_topic,
        progress=progress,
        retry_limit=retry_limit,
    )
    _on_stop_signals(job.stop)
    _freeze_start_up_objects()
    return job.run()


def _run_sink(config: SinkConfig) -> None:
    # Start-up (imports, reaching Kafka, MLflow and the registry) takes seconds; a SIGTERM
    # then ends the daemon as one later does, with exit 0, rather than killing it.
    early = threading.Event()
    _on_stop_signals(early.set, "stopping before the sink starts")
    _mlflow_environment()
    _import_mlflow()
    from kafka_mlflow_sink.codec import check_registry, make_codec
    from kafka_mlflow_sink.offsets import check_kafka
    from kafka_mlflow_sink.sink import Sink
    from kafka_mlflow_sink.writer import MlflowWriter, check_mlflow

    codec = make_codec(config.framing, config.schema_registry_url)  # settings first
    if early.is_set():
        return
    check_kafka(config)
    if early.is_set():
        return
    writer = MlflowWriter(config.tracking_uri, parallelism=config.writer_threads())
    check_mlflow(writer)
    check_registry(codec, config.schema_registry_url)
    _warn_unused(config)
    logger.info(
        "kafka-mlflow-sink %s starting with %s; writing %d run(s) at once",
        __version__,
        config.redacted(),
        writer.parallelism,
    )
    sink = Sink(config, codec, writer)
    _on_stop_signals(sink.stop)
    if early.is_set():
        sink.stop()  # it closes what it opened and returns at once
    _freeze_start_up_objects()
    sink.run()
