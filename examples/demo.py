"""`make demo`: a training job's events cross a real Kafka broker into MLflow.

Steps, each printed as it happens:

1. start a local Apache Kafka broker (KRaft, from Maven Central jars) and create the topic;
2. start the sink daemon, writing to MLflow's embedded default store (``sqlite:///mlflow.db``
   in this folder) unless ``MLFLOW_TRACKING_URI`` names another;
3. run the digits training script, which publishes its run through the Publisher;
4. wait until the sink has committed every record;
5. print what landed in MLflow, then stop the sink (SIGTERM) and the broker.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from localstack import JARS_MARKER, KAFKA_LIBS, KafkaBroker, create_topic  # noqa: E402

TOPIC = "mlflow-events"
EXPERIMENT = "digits"
BIN = Path(sys.executable).parent


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def start_sink(bootstrap: str, log_file: Path) -> subprocess.Popen[bytes]:
    command = [
        str(BIN / "kafka-mlflow-sink"),
        "run",
        "-b",
        bootstrap,
        "-t",
        TOPIC,
        "--group-id",
        "demo-sink",
        "--stats-interval",
        "5",
    ]
    return subprocess.Popen(command, cwd=REPO, stdout=log_file.open("wb"), stderr=subprocess.STDOUT)


def train(bootstrap: str) -> str:
    """Run the training script; return the run key it published."""
    script = REPO / "examples" / "train_digits.py"
    done = subprocess.run(
        [sys.executable, str(script), "-b", bootstrap, "-t", TOPIC, "--experiment", EXPERIMENT],
        check=True,
        capture_output=True,
        text=True,
    )
    print(done.stdout.strip())
    match = re.search(r"published run key (\w+)", done.stdout)
    if match is None:
        raise SystemExit(f"the training script did not say which run it published:\n{done.stdout}")
    return match.group(1)


def summary_of(sink_log: Path) -> str:
    """The sink's own account of what it wrote, from its last log line."""
    lines = [line for line in sink_log.read_text().splitlines() if "stopping:" in line]
    return "sink wrote: " + lines[-1].split("stopping: ", 1)[1] if lines else "sink wrote: ?"


def wait_committed(bootstrap: str, timeout: float) -> None:
    result = subprocess.run(
        [
            str(BIN / "kafka-mlflow-sink"),
            "lag",
            "-b",
            bootstrap,
            "-t",
            TOPIC,
            "-g",
            "demo-sink",
            "--wait",
            str(timeout),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    print(result.stdout.strip())
    if result.returncode != 0:
        raise SystemExit(
            f"the sink did not commit everything within {timeout:.0f}s; "
            f"see {REPO / '.cache/demo/sink.log'}\n{result.stderr.strip()}"
        )


def show_mlflow(tracking_uri: str | None, run_key: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"experiment {EXPERIMENT!r} is not in MLflow")
    print(f"tracking URI : {client.tracking_uri}")
    print(f"experiment   : {experiment.name} (id {experiment.experiment_id})")
    this_demo = f"tags.`kafka_mlflow_sink.run_key` = '{run_key}'"
    for run in client.search_runs([experiment.experiment_id], this_demo):
        info, data = run.info, run.data
        took = (info.end_time - info.start_time) / 1000 if info.end_time else float("nan")
        print(
            f"run          : {info.run_name} ({info.run_id}) status={info.status} "
            f"duration={took:.1f}s run_key={data.tags.get('kafka_mlflow_sink.run_key')}"
        )
        print("params       : " + ", ".join(f"{k}={v}" for k, v in sorted(data.params.items())))
        points = sum(len(client.get_metric_history(info.run_id, k)) for k in data.metrics)
        print(
            "last metrics : "
            + ", ".join(f"{k}={v:.4f}" for k, v in sorted(data.metrics.items()))
            + f"  ({points} points in all)"
        )
        user_tags = {k: v for k, v in data.tags.items() if not k.startswith(("mlflow.", "kafka_"))}
        print("tags         : " + ", ".join(f"{k}={v}" for k, v in sorted(user_tags.items())))
        artifacts = [a.path for a in client.list_artifacts(info.run_id, "evaluation")]
        print(f"artifacts    : {', '.join(artifacts)}")


def main() -> None:
    started = time.monotonic()
    workdir = REPO / ".cache" / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    fetched = (KAFKA_LIBS / JARS_MARKER).exists()
    step(
        "starting a local Kafka broker"
        + ("" if fetched else " (first fetching its jars from Maven Central)")
    )
    with KafkaBroker(workdir / "kafka") as broker:
        bootstrap = broker.bootstrap_servers
        create_topic(bootstrap, TOPIC, partitions=3)
        print(f"broker at {bootstrap}, topic {TOPIC} with 3 partitions")
        step(f"starting the sink daemon -> {tracking_uri or 'sqlite:///mlflow.db (embedded)'}")
        sink_log = workdir / "sink.log"
        sink = start_sink(bootstrap, sink_log)
        try:
            step("training a digits classifier; its run is published to Kafka")
            run_key = train(bootstrap)
            step("waiting until the sink has committed every record")
            wait_committed(bootstrap, timeout=120)
        finally:
            sink.send_signal(signal.SIGTERM)
            code = sink.wait(timeout=60)
            print(f"sink stopped with exit code {code}; its log: {sink_log}")
            print(summary_of(sink_log))
    step("what landed in MLflow")
    show_mlflow(tracking_uri, run_key)
    print(
        f"\ndemo finished in {time.monotonic() - started:.0f}s; browse it with: "
        f".venv/bin/mlflow ui --backend-store-uri {tracking_uri or 'sqlite:///mlflow.db'}"
    )


if __name__ == "__main__":
    main()
