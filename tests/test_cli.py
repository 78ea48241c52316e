"""The command line: one readable line and a non-zero exit for every mistake a user can fix."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import KafkaError, KafkaException

from kafka_mlflow_sink.cli import cli
from kafka_mlflow_sink.sink import _commit_retriable

BIN = Path(sys.executable).parent / "kafka-mlflow-sink"


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli, list(args), env={"MLFLOW_TRACKING_URI": None, "KAFKA_BOOTSTRAP_SERVERS": None}
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def test_help_lists_the_commands_and_options() -> None:
    code, out = invoke("--help")
    assert code == 0 and "run" in out and "lag" in out
    code, out = invoke("run", "--help")
    assert code == 0 and "--bootstrap-servers" in out and "--dead-letter-topic" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["run", "--framing", "registry", "-b", "x:1"],
            "framing 'registry' needs schema_registry_url",
        ),
        (["run", "-b", "x:1", "--batch-max-records", "0"], "batch_max_records must be at least 1"),
        (["run", "-b", "x:1", "--kafka", "novalue"], "must look like KEY=VALUE"),
        (["run", "-b", "x:1", "--kafka", "enable.auto.commit=true"], "managed by the sink"),
        (["run", "-b", "x:1", "-t", "a", "--dead-letter-topic", "a"], "must differ"),
        (["run"], "bootstrap_servers is required"),
        # Everything written would vanish at exit while Kafka counts it as done.
        (["run", "-b", "x:1", "--tracking-uri", "sqlite://"], "is an in-memory database"),
        (["replay", "-b", "x:1", "--tracking-uri", "sqlite:///:memory:"], "in-memory database"),
        (["run", "-b", "x:1", "--tracking-uri", "sqlite:///file::memory:?cache=shared"], "memory"),
    ],
)
def test_bad_settings_end_with_one_line_and_exit_2(args: list[str], message: str) -> None:
    code, out = invoke(*args)
    assert code == 2
    (line,) = out.strip().splitlines()
    assert line.startswith("kafka-mlflow-sink: error: configuration: ")
    assert message in line


def test_unknown_setting_in_a_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "sink.toml"
    config.write_text('bootstrap_servers = "x:1"\nbatch_size = 5\n')
    code, out = invoke("run", "--config", str(config))
    assert code == 2 and "unknown setting 'batch_size'" in out


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('batch_max_records = "lots"', "batch_max_records must be a number, not 'lots'"),
        ("group_id = 5", "group_id must be a string, not 5"),
        ('[kafka]\n"sasl.password" = "***"', "is the mask '***' from a printed configuration"),
        ("tracking_uri = 5", "configuration: tracking_uri must be a string, not 5"),
        (
            "schema_registry_url = [1]",
            "configuration: schema_registry_url must be a string, not [1]",
        ),
        ("topics = 5", "configuration: topics must be a list of topic names, not 5"),
        ("topics = [1, 2]", "configuration: topics must be a list of topic names"),
        ("kafka = 5", "configuration: kafka must be a table of librdkafka settings, not 5"),
        (
            '[kafka]\n"session.timeout.ms" = 2020-01-01',
            "'session.timeout.ms' must be a string or a number",
        ),
        ('[kafka]\n"sasl.password" = ["hunter2"]', "'sasl.password' must be a string or a number"),
    ],
)
def test_wrong_values_in_a_config_file_are_configuration_errors(
    tmp_path: Path, toml: str, message: str
) -> None:
    config = tmp_path / "sink.toml"
    config.write_text(f'bootstrap_servers = "x:1"\n{toml}\n')
    code, out = invoke("run", "--config", str(config))
    assert code == 2 and message in out


def test_config_file_values_lose_to_flags(tmp_path: Path) -> None:
    config = tmp_path / "sink.toml"
    config.write_text(
        'bootstrap_servers = "file:1"\ngroup_id = "from-file"\n'
        '[kafka]\n"security.protocol" = "SASL_SSL"\n'
    )
    code, out = invoke("run", "--config", str(config), "-g", "from-flag", "--print-config")
    assert code == 0
    assert 'group_id = "from-flag"' in out and 'bootstrap_servers = "file:1"' in out
    assert '"security.protocol" = "SASL_SSL"' in out


def test_printed_config_reads_back_as_a_config_file(tmp_path: Path) -> None:
    code, first = invoke(
        "run", "-b", "x:1", "-t", "a", "-t", "b", "--kafka", "linger.ms=5", "--print-config"
    )
    assert code == 0
    (tmp_path / "printed.toml").write_text(first)
    code, second = invoke("run", "--config", str(tmp_path / "printed.toml"), "--print-config")
    assert code == 0 and second == first


def test_topics_from_the_environment_may_be_comma_separated() -> None:
    result = CliRunner().invoke(
        cli, ["run", "-b", "x:1", "--print-config"], env={"KAFKA_MLFLOW_SINK_TOPICS": "a, b"}
    )
    assert 'topics = ["a", "b"]' in result.output
    assert 'dead_letter_topic = "a.dlq"' in result.output


def test_printed_config_never_shows_secrets() -> None:
    code, out = invoke(
        "run",
        "-b",
        "x:1",
        "--kafka",
        "sasl.password=hunter2",
        "--kafka",
        "ssl.key.password=pw2",
        "--tracking-uri",
        "https://alice:s3cret@mlflow.example.com",
        "--print-config",
    )
    assert code == 0
    assert "hunter2" not in out and "pw2" not in out and "s3cret" not in out
    assert '"sasl.password" = "***"' in out and "alice:***@mlflow.example.com" in out


def test_unknown_option_is_a_usage_error() -> None:
    code, out = invoke("run", "--no-such-option")
    assert code == 2 and "No such option '--no-such-option'" in out


def test_unreachable_broker_is_one_line_and_exit_3() -> None:
    result = subprocess.run(
        [str(BIN), "run", "-b", "127.0.0.1:1", "-t", "t"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert lines == [lines[0]] and "cannot reach Kafka at 127.0.0.1:1" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_missing_topic_and_unreachable_mlflow_are_one_line_each(
    kafka_bootstrap_servers: str, topic: Callable[..., str]
) -> None:
    missing = subprocess.run(
        [str(BIN), "run", "-b", kafka_bootstrap_servers, "-t", "no-such-topic"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 3
    assert "error: topic 'no-such-topic' does not exist" in missing.stderr
    lag = subprocess.run(
        [str(BIN), "lag", "-b", kafka_bootstrap_servers, "-t", "no-such-topic"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lag.returncode == 3 and "topic 'no-such-topic' does not exist" in lag.stderr
    down = subprocess.run(
        [
            str(BIN),
            "run",
            "-b",
            kafka_bootstrap_servers,
            "-t",
            topic(),
            "--tracking-uri",
            "http://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 3
    assert "error: cannot reach MLflow at http://127.0.0.1:1" in down.stderr
    # A refused connection is not a server fault: MLflow's INTERNAL_ERROR tag is not repeated.
    assert "Connection refused" in down.stderr and "INTERNAL_ERROR" not in down.stderr
    assert "Traceback" not in down.stderr + missing.stderr


@pytest.mark.integration
def test_bad_and_unreachable_schema_registries_are_one_line_each(
    kafka_bootstrap_servers: str, mlflow_tracking_uri: str, topic: Callable[..., str]
) -> None:
    def run(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(str(BIN), "run", "-b", kafka_bootstrap_servers, "-t", topic()),
                *("--tracking-uri", mlflow_tracking_uri),
                *("--framing", "registry", "--schema-registry-url", url),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    invalid = run("ftp://registry")
    assert invalid.returncode == 2
    assert invalid.stderr.strip().endswith("Invalid url ftp://registry")
    elsewhere = run(mlflow_tracking_uri)  # a server, but not a Schema Registry
    assert elsewhere.returncode == 2
    assert elsewhere.stderr.strip().endswith(
        f"{mlflow_tracking_uri} does not answer like a Schema Registry (HTTP 404 for /subjects)"
    )
    down = run("http://alice:s3cret@127.0.0.1:1")
    assert down.returncode == 3
    assert "error: cannot reach the Schema Registry at http://alice:***@127.0.0.1:1" in down.stderr
    assert "s3cret" not in down.stderr
    assert "Traceback" not in invalid.stderr + down.stderr


@pytest.mark.parametrize(
    ("code", "retriable"),
    [
        (KafkaError.NOT_COORDINATOR, True),
        (KafkaError.COORDINATOR_LOAD_IN_PROGRESS, True),
        (KafkaError.ILLEGAL_GENERATION, False),
        (KafkaError.UNKNOWN_TOPIC_OR_PART, False),
    ],
)
def test_commits_are_retried_only_while_the_coordinator_moves(code: int, retriable: bool) -> None:
    assert _commit_retriable(KafkaException(KafkaError(code))) is retriable


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("1700000000", "looks like seconds"),
        ("99999999999999999999", "out of range"),
        ("1960-01-01T00:00:00Z", "before 1970"),
        ("2026-01-01T00:00:00", "no time zone"),
        ("yesterday", "neither ISO 8601"),
    ],
)
def test_replay_start_times_that_cannot_be_meant_are_refused(text: str, message: str) -> None:
    from kafka_mlflow_sink.errors import ConfigError
    from kafka_mlflow_sink.reader import parse_timestamp

    with pytest.raises(ConfigError, match=message):
        parse_timestamp(text)


def test_replay_start_times_are_read_as_milliseconds() -> None:
    from kafka_mlflow_sink.reader import parse_timestamp

    assert parse_timestamp("2026-12-03T00:00:00Z") == 1_796_256_000_000
    assert parse_timestamp("2026-12-03T01:00:00+01:00") == 1_796_256_000_000
    assert parse_timestamp("1796256000000") == 1_796_256_000_000


@pytest.mark.integration
def test_create_topics_says_what_it_did_and_an_unreachable_broker_is_exit_3(
    kafka_bootstrap_servers: str,
) -> None:
    name = f"created-{uuid.uuid4().hex[:8]}"
    args = ["create-topics", "-b", kafka_bootstrap_servers, "-t", name, "--partitions", "3"]
    first = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [f"{name}: created", f"{name}.dlq: created"]
    again = subprocess.run([str(BIN), *args[:-1], "12"], capture_output=True, text=True, timeout=60)
    assert again.stdout.splitlines()[0] == f"{name}: exists (3 partitions)"
    down = subprocess.run(
        [str(BIN), "create-topics", "-b", "127.0.0.1:1"], capture_output=True, text=True, timeout=60
    )
    assert down.returncode == 3
    assert down.stderr.strip().endswith(
        "cannot reach Kafka at 127.0.0.1:1 within 10s "
        "(Failed to get metadata: Local: Broker transport failure)"
    )


@pytest.mark.parametrize(
    ("uri", "threads"), [("http://mlflow:5000", 4), ("sqlite:///mlflow.db", 1)]
)
def test_printed_config_says_what_automatic_writers_mean(uri: str, threads: int) -> None:
    code, out = invoke("run", "-b", "x:1", "--tracking-uri", uri, "--print-config")
    assert code == 0
    # Under its key, not after the last table, where TOML would read it as part of [kafka].
    assert f"writers = 0\n# 0 writes {threads} run(s) at once here\n" in out


def test_secrets_in_uris_quoted_by_an_error_are_masked() -> None:
    code, out = invoke(
        "run", "-b", "x:1", "--framing", "registry", "--schema-registry-url", "ftp://u:hunter2@h"
    )
    assert code == 2 and "ftp://u:***@h" in out and "hunter2" not in out


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("htps://alice:S3cret@mlflow.example.com", "htps://alice:***@mlflow.example.com"),
        ("https://ghp_token123@mlflow.example.com/x", "https://***@mlflow.example.com/x"),
        ("at http://h:5000/api?token=abc&run=1 now", "at http://h:5000/api?token=***&run=1 now"),
        ("https://h/p?X-Amz-Signature=f00&a=b", "https://h/p?X-Amz-Signature=***&a=b"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ],
)
def test_redact_uri_masks_passwords_tokens_and_secret_query_values(text: str, shown: str) -> None:
    from kafka_mlflow_sink.config import redact_uri

    assert redact_uri(text) == shown


def test_a_kafka_setting_given_as_a_toml_boolean_reads_as_librdkafka_spells_it(
    tmp_path: Path,
) -> None:
    config = tmp_path / "sink.toml"
    config.write_text('[kafka]\n"enable.ssl.certificate.verification" = false\n')
    code, out = invoke("run", "--config", str(config), "-b", "x:1", "--print-config")
    assert code == 0 and '"enable.ssl.certificate.verification" = "false"' in out


def _python(code: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_daemons_process_writes_to_mlflow_without_pandas(tmp_path: Path) -> None:
    """What the console script does before a command: MLflow works, pandas stays out."""
    code = f"""
import sys
from kafka_mlflow_sink import cli
cli._keep_pandas_out()
cli._import_mlflow()
from kafka_mlflow_sink.events import MetricPoint, MetricsLogged, RunEvent, RunStarted
from kafka_mlflow_sink.plan import Position, SourcedEvent, group_by_run
from kafka_mlflow_sink.writer import MlflowWriter
events = [RunStarted(1, "r"), MetricsLogged((MetricPoint("m", 0.5, 0, 2),))]
batch = [SourcedEvent(RunEvent("k", "e", p), Position("t", 0, i)) for i, p in enumerate(events)]
writer = MlflowWriter("sqlite:///{tmp_path / "mlflow.db"}")
report = writer.apply(group_by_run(batch))
(run,) = writer.client.search_runs(["1"])
print(report.points, run.data.metrics, sys.modules["pandas"])
"""
    assert _python(code, tmp_path) == "1 {'m': 0.5} None"


def test_pandas_comes_back_when_mlflow_cannot_do_without_it(tmp_path: Path) -> None:
    (tmp_path / "needs_pandas.py").write_text("import pandas\n")
    code = """
import sys
from kafka_mlflow_sink import cli
cli._keep_pandas_out()
cli._import_mlflow("needs_pandas")
print(type(sys.modules["needs_pandas"].pandas.DataFrame).__name__)
"""
    assert _python(code, tmp_path) == "type"


def test_mlflows_own_stack_traces_of_database_errors_stay_out_of_the_log() -> None:
    """The sink reports a locked or read-only SQLite store itself, in one line."""
    import logging

    from kafka_mlflow_sink.cli import _setup_logging

    store_log = logging.getLogger("mlflow.store.db.utils")
    try:
        _setup_logging("info")
        assert not store_log.isEnabledFor(logging.ERROR)
        _setup_logging("debug")
        assert store_log.isEnabledFor(logging.DEBUG)
    finally:
        store_log.setLevel(logging.NOTSET)


@pytest.mark.integration
def test_a_sigterm_during_start_up_stops_the_daemon_with_exit_0(
    kafka_bootstrap_servers: str, topic: Callable[..., str], tmp_path: Path
) -> None:
    """Start-up takes seconds (imports, Kafka, a fresh store); a stop then is still clean."""
    import signal
    import time

    log = tmp_path / "sink.log"
    with log.open("wb") as out:
        sink = subprocess.Popen(
            [str(BIN), "run", "-b", kafka_bootstrap_servers, "-t", topic(),
             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    status = Path(f"/proc/{sink.pid}/status")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the daemon catches SIGTERM
        caught = next(ln for ln in status.read_text().splitlines() if ln.startswith("SigCgt"))
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            break
        time.sleep(0.01)
    sink.send_signal(signal.SIGTERM)
    assert sink.wait(timeout=60) == 0, log.read_text()
    assert "SIGTERM received: stopping before the sink starts" in log.read_text()
