# The sink daemon. Build: docker build -t kafka-mlflow-sink .
# Run:   docker run kafka-mlflow-sink run -b kafka:9092 --tracking-uri http://mlflow:5000
#        (the entry point is the CLI; `run`, `replay`, `verify`, `lag` are its commands)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /tmp/src/
COPY schemas /tmp/src/schemas
COPY kafka_mlflow_sink /tmp/src/kafka_mlflow_sink
RUN pip install /tmp/src && rm -rf /tmp/src

RUN useradd --create-home --uid 10001 sink
USER sink
WORKDIR /home/sink

ENTRYPOINT ["kafka-mlflow-sink"]
CMD ["run"]
