"""The whole path on real parts: Publisher -> Kafka broker -> sink daemon -> MLflow server."""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from kafka_mlflow_sink import Publisher
from tests.support import (
    SinkProcess,
    assert_mlflow_holds,
    consume_all,
    mlflow_runs,
    sink_args,
    topic_runs,
    wait_for_zero_lag,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def test_example_training_runs_land_in_mlflow_exactly_as_published(
    kafka_bootstrap_servers: str,
    mlflow_tracking_uri: str,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
    tmp_path: Path,
) -> None:
    events = topic(partitions=3)
    experiment = f"digits-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "train_digits.py"),
            "-b",
            kafka_bootstrap_servers,
            "-t",
            events,
            "--experiment",
            experiment,
            "--epochs",
            "6",
        ],
        check=True,
        capture_output=True,
    )
    # A nested run with values the example does not produce: NaN, unicode, an empty tag map.
    with (
        Publisher(kafka_bootstrap_servers, events, experiment_name=experiment) as pub,
        pub.start_run(run_name="sweep ✓"),
    ):
        pub.log_param("grid", "λ∈{0.1, 1}")
        with pub.start_run(run_name="trial-1", nested=True):
            pub.log_metrics({"loss": math.nan, "größe": 2.5}, step=3, timestamp=1234)
            pub.log_bytes(b"\x00\x01binary", "raw/blob.bin")

    sink = start_sink(*sink_args(kafka_bootstrap_servers, events, "e2e", mlflow_tracking_uri))
    rows = wait_for_zero_lag(kafka_bootstrap_servers, events, "e2e", sink)

    truth = topic_runs(kafka_bootstrap_servers, events)
    assert len(truth) == 3
    assert sum(len(v.points) for v in truth.values()) == 6 * 4 + 2
    assert sum(len(v.artifacts) for v in truth.values()) == 2
    assert_mlflow_holds(truth, mlflow_runs(mlflow_tracking_uri, truth))
    assert sum(r.end for r in rows) == len(consume_all(kafka_bootstrap_servers, events))
    assert all(r.committed == r.end for r in rows if r.end > 0)
