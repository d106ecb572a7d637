#!/usr/bin/env bash
# Create MLflow's role and database on an existing PostgreSQL server (run once, as a superuser).
#
#   sudo apt-get install -y postgresql                       # Debian/Ubuntu host: server + psql
#   sudo -u postgres MLFLOW_DB_PASSWORD=... infra/mlflow/create-database.sh
#
# PGHOST / PGPORT / PGUSER pick the server and the superuser, as for psql. Safe to re-run.
set -euo pipefail
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
user="${MLFLOW_DB_USER:-mlflow}"
db="${MLFLOW_DB_NAME:-mlflow}"
psql -v ON_ERROR_STOP=1 -d postgres -v user="$user" -v password="$MLFLOW_DB_PASSWORD" -v db="$db" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL
echo "database $db owned by $user: MLFLOW_DB_URI=postgresql://$user:PASSWORD@${PGHOST:-localhost}:${PGPORT:-5432}/$db"
