"""A soak: the sink under a steady load for ten minutes, its memory sampled all along.

Memory must stay flat once the sink has warmed up (a daemon that grows with every run it has
ever seen dies after weeks), and consumer lag must return to 0 once the load stops. The
figures are written to ``build/soak.json`` and printed in the session summary. The length
can be shortened for a quick look with ``KAFKA_MLFLOW_SINK_SOAK_SECONDS``; CI runs all of it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from localstack import MlflowServer

from tests.support import (
    SOAK_FIGURES,
    SinkProcess,
    SteadyLoad,
    assert_nothing_lost_or_duplicated,
    lag,
    sink_args,
    tally,
    wait_for_zero_lag,
)

SOAK_SECONDS = float(os.environ.get("KAFKA_MLFLOW_SINK_SOAK_SECONDS", "600"))

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.soak,
    pytest.mark.timeout(SOAK_SECONDS + 900),
]
EVENTS_PER_SECOND = 100  # each metric event carries 3 points
SAMPLE_EVERY = 5.0
WARM_UP = 90.0  # imports done, caches and librdkafka buffers at their working size
# Growth allowed from the warmed-up level to the end: allocator noise, not a leak. A cache
# of every finished run's points would grow about 20 kB per run, some 25 MB in ten minutes.
ALLOWED_GROWTH_MB = 12.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def test_a_soak_keeps_memory_flat_and_lag_returns_to_zero(
    kafka_bootstrap_servers: str,
    mlflow_server: MlflowServer,
    topic: Callable[..., str],
    start_sink: Callable[..., SinkProcess],
) -> None:
    events = topic(partitions=4)
    sink = start_sink(
        *sink_args(kafka_bootstrap_servers, events, "soak", mlflow_server.tracking_uri),
        *("--log-level", "INFO", "--stats-interval", "60"),
    )
    samples: list[tuple[float, float]] = []  # seconds into the soak, RSS in MB
    lags: list[tuple[float, int]] = []
    with SteadyLoad(
        kafka_bootstrap_servers, events, EVENTS_PER_SECOND, steps=40, runs_at_once=8
    ) as load:
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < SOAK_SECONDS:
            assert sink.process.poll() is None, sink.log()[-3000:]
            samples.append((elapsed, rss_mb(sink.process.pid)))
            if len(samples) % 6 == 0:
                lags.append(
                    (elapsed, sum(r.lag for r in lag(kafka_bootstrap_servers, events, "soak")))
                )
            time.sleep(SAMPLE_EVERY)
    lag_at_stop = sum(r.lag for r in lag(kafka_bootstrap_servers, events, "soak"))
    stopped = time.monotonic()
    wait_for_zero_lag(kafka_bootstrap_servers, events, "soak", sink, timeout=300)
    drained = time.monotonic() - stopped
    samples.append((time.monotonic() - began, rss_mb(sink.process.pid)))

    warm = [mb for t, mb in samples if WARM_UP <= t < WARM_UP + 60] or [samples[-1][1]]
    tail = [mb for t, mb in samples if t >= SOAK_SECONDS * 0.8]
    figures = {
        "seconds": round(SOAK_SECONDS),
        "events": load.events,
        "runs": load.runs,
        "events_per_second": round(load.events / SOAK_SECONDS, 1),
        "rss_mb_first": round(samples[0][1], 1),
        "rss_mb_warm": round(statistics.median(warm), 1),
        "rss_mb_end": round(statistics.median(tail), 1),
        "rss_mb_max": round(max(mb for _, mb in samples), 1),
        "max_lag_during_load": max((n for _, n in lags), default=0),
        "lag_at_stop": lag_at_stop,
        "seconds_to_zero_lag": round(drained, 1),
        "rss_samples": [(round(t), round(mb, 1)) for t, mb in samples],
    }
    SOAK_FIGURES.parent.mkdir(parents=True, exist_ok=True)
    SOAK_FIGURES.write_text(json.dumps(figures, indent=1))

    growth = figures["rss_mb_end"] - figures["rss_mb_warm"]
    assert growth <= ALLOWED_GROWTH_MB, f"RSS grew {growth:.1f} MB after warm-up: {figures}"
    result = tally(
        f"soak: {SOAK_SECONDS:.0f} s at {EVENTS_PER_SECOND} events/s",
        kafka_bootstrap_servers,
        events,
        mlflow_server.tracking_uri,
    )
    assert_nothing_lost_or_duplicated(result)
    assert result.records_in == load.events
