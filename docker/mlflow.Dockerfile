# The MLflow tracking server + model registry of docker/compose.yaml: MLflow with the Postgres driver, no torch.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir /mlartifacts \
    && chown mlflow:mlflow /mlartifacts
# mlflow (numeric, so that the runtime need not resolve the name)
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
