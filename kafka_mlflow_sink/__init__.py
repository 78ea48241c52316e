"""kafka-mlflow-sink: Kafka as the transport for MLflow experiment tracking.

Training jobs publish run events with ``Publisher``; the ``kafka-mlflow-sink run`` daemon
writes them into MLflow and commits Kafka offsets only after MLflow accepted the writes.
"""

from kafka_mlflow_sink.errors import (
    ConfigError,
    DecodeError,
    PermanentWriteError,
    PublishError,
    SinkError,
    TransientWriteError,
)
from kafka_mlflow_sink.publisher import PublishedRun, Publisher

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DecodeError",
    "PermanentWriteError",
    "PublishError",
    "PublishedRun",
    "Publisher",
    "SinkError",
    "TransientWriteError",
    "__version__",
]
