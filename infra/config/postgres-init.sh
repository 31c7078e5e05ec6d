#!/bin/sh
# The logins and databases of `make stack` (infra/stack.toml [postgres], made there by
# infra/servers.py create_databases): one login per service, each owning its databases.
# The postgres image runs this once, on an empty data folder (/docker-entrypoint-initdb.d/);
# the passwords come from the environment, never from a file in git.
set -eu
: "${MLFLOW_DB_PASSWORD:?}" "${PREFECT_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v mlflow_password="$MLFLOW_DB_PASSWORD" -v prefect_password="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE prefect OWNER prefect;
SQL
