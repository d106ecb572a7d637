#!/usr/bin/env bash
# The shared MLflow tracking server, without Docker: PostgreSQL for runs, metrics and the model registry,
# an artifact store (S3-compatible, GCS, or a path) that the server proxies, so clients need no bucket
# credentials of their own.
#
#   pip install mlflow==3.17.2 "psycopg[binary]" boto3
#   MLFLOW_DB_URI=postgresql://mlflow:PASSWORD@127.0.0.1:5432/mlflow \
#   MLFLOW_ARTIFACTS=s3://my-bucket/mlflow infra/mlflow/serve.sh
#
# Clients then set MLFLOW_TRACKING_URI=http://THIS_HOST:5000. For a MinIO or other S3-compatible store
# set MLFLOW_S3_ENDPOINT_URL (and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) in this server's environment.
set -euo pipefail
: "${MLFLOW_DB_URI:?set MLFLOW_DB_URI=postgresql://USER:PASSWORD@HOST:PORT/DB (see infra/mlflow/create-database.sh)}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS to s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a directory}"
host="${MLFLOW_HOST:-0.0.0.0}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"

# The schema is created on first start and migrated on upgrades; doing it here, once, keeps concurrent
# workers from racing to migrate.
mlflow db upgrade "$MLFLOW_DB_URI"
exec mlflow server \
  --backend-store-uri "$MLFLOW_DB_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --serve-artifacts \
  --host "$host" --port "$port" --workers "$workers"
