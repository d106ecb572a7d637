#!/usr/bin/env bash
# The shared MLflow tracking server, without Docker: PostgreSQL for runs, metrics, the model registry and
# the users, an artifact store (S3-compatible, GCS, or a path) that the server proxies, so clients need no
# bucket credentials of their own. Every request needs a login (MLflow's basic-auth app): anonymous reads,
# writes and artifact uploads are refused with 401.
#
#   pip install "mlflow[auth]==3.17.2" "psycopg[binary]" boto3
#   MLFLOW_DB_URI=postgresql://mlflow:PASSWORD@127.0.0.1:5432/mlflow \
#   MLFLOW_ARTIFACTS=s3://my-bucket/mlflow \
#   MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=$(openssl rand -hex 32) \
#   MLFLOW_HOST=10.0.0.5 infra/mlflow/serve.sh
#
# MLFLOW_HOST is the address to listen on: the private interface the cluster reaches (infra/README.md,
# section 0); the default, 127.0.0.1, serves this machine only. Never bind an address the internet reaches:
# basic auth over plain HTTP sends passwords readable on the wire (put a TLS proxy in front if you must).
# MLFLOW_SERVER_ALLOWED_HOSTS: the Host names clients may use (MLflow answers 403 to any other); the
# default covers our manifests (mlflow.internal in infra/ray/, mlflow.mlflow.svc.cluster.local in
# infra/k8s/) and this machine. MLFLOW_AUTH_ADMIN_USERNAME (default admin) and MLFLOW_AUTH_ADMIN_PASSWORD
# create the admin user on the first start only (later changes: the update-password API);
# MLFLOW_AUTH_DB_URI keeps the users elsewhere than MLFLOW_DB_URI (the default; MLflow's auth tables have
# their own migration history). Clients set MLFLOW_TRACKING_URI=http://HOST:5000 and log in with
# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. For a MinIO or other S3-compatible store set
# MLFLOW_S3_ENDPOINT_URL (and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) in this server's environment.
set -euo pipefail
: "${MLFLOW_DB_URI:?set MLFLOW_DB_URI=postgresql://USER:PASSWORD@HOST:PORT/DB (see infra/mlflow/create-database.sh)}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS to s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a directory}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD: the password of the admin user, set on its first start}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (openssl rand -hex 32; the same on every server)}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"
allowed="${MLFLOW_SERVER_ALLOWED_HOSTS:-mlflow.internal,mlflow.internal:*,mlflow.mlflow.svc.cluster.local,mlflow.mlflow.svc.cluster.local:*,mlflow.mlflow.svc,mlflow.mlflow.svc:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" MLFLOW_AUTH_ADMIN_PASSWORD
export MLFLOW_FLASK_SERVER_SECRET_KEY

# The auth app reads its settings from an ini file: written here, readable by this user only, from the
# environment (the admin password is not in it: MLflow takes it from MLFLOW_AUTH_ADMIN_PASSWORD).
config_dir="$(mktemp -d)"
server=""
cleanup() { if [ -n "$server" ]; then kill -TERM "$server" 2>/dev/null || true; wait "$server" || true; fi; rm -rf "$config_dir"; }
trap cleanup EXIT
trap 'exit 143' INT TERM

umask 077  # the ini names the database URI (its password)
cat > "$config_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DB_URI:-$MLFLOW_DB_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"

# The schema is created on first start and migrated on upgrades; doing it here, once, keeps concurrent
# workers from racing to migrate.
mlflow db upgrade "$MLFLOW_DB_URI"
mlflow server \
  --app-name basic-auth \
  --backend-store-uri "$MLFLOW_DB_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --serve-artifacts \
  --allowed-hosts "$allowed" \
  --host "$host" --port "$port" --workers "$workers" &
server=$!
wait "$server"
