"""Train a digit classifier and track it through Kafka instead of talking to MLflow.

A real training job: scikit-learn's bundled 8x8 digits, a linear classifier trained epoch by
epoch with ``partial_fit``. Hyperparameters, per-epoch loss and accuracy, tags and a confusion
matrix go out as run events through the Publisher; the sink daemon writes them into MLflow.

    python examples/train_digits.py --bootstrap-servers 127.0.0.1:9092 --topic mlflow-events
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import sklearn
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from kafka_mlflow_sink import Publisher


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", "-b", required=True)
    parser.add_argument("--topic", "-t", default="mlflow-events")
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--run-name", default="sgd-digits")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=1e-4)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args()


def train(publisher: Publisher, args: argparse.Namespace) -> str:
    """Train, publishing the run's events; returns the run key."""
    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=args.seed, stratify=digits.target
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
    classes = np.unique(digits.target)
    model = SGDClassifier(
        loss="log_loss",
        alpha=args.alpha,
        learning_rate="constant",
        eta0=args.learning_rate,
        random_state=args.seed,
    )
    tags = {
        "dataset": "sklearn.datasets.load_digits",
        "model": "SGDClassifier",
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }
    with publisher.start_run(run_name=args.run_name, tags=tags) as run:
        publisher.log_params(
            {
                "alpha": args.alpha,
                "learning_rate": args.learning_rate,
                "epochs": args.epochs,
                "seed": args.seed,
                "train_size": len(x_train),
                "val_size": len(x_val),
            }
        )
        for epoch in range(args.epochs):
            model.partial_fit(x_train, y_train, classes=classes)
            publisher.log_metrics(
                {
                    "train_loss": log_loss(y_train, model.predict_proba(x_train), labels=classes),
                    "val_loss": log_loss(y_val, model.predict_proba(x_val), labels=classes),
                    "train_accuracy": accuracy_score(y_train, model.predict(x_train)),
                    "val_accuracy": accuracy_score(y_val, model.predict(x_val)),
                },
                step=epoch,
            )
        matrix = confusion_matrix(y_val, model.predict(x_val), labels=classes)
        header = "true\\pred " + " ".join(f"{c:>3}" for c in classes)
        rows = [
            f"{c:>9} " + " ".join(f"{n:>3}" for n in row)
            for c, row in zip(classes, matrix, strict=True)
        ]
        publisher.log_text("\n".join([header, *rows]) + "\n", "evaluation/confusion_matrix.txt")
        publisher.set_tag(
            "val_accuracy_final", f"{accuracy_score(y_val, model.predict(x_val)):.4f}"
        )
        return run.run_key


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    with Publisher(args.bootstrap_servers, args.topic, experiment_name=args.experiment) as pub:
        run_key = train(pub, args)
    print(
        f"published run key {run_key}: {pub.events_sent} events, {args.epochs} epochs, "
        f"to {args.topic} in {time.monotonic() - started:.1f}s"
    )


if __name__ == "__main__":
    main()
