#!/bin/sh
# Run once by the postgres image when its data volume is empty (docker-entrypoint-initdb.d): the runtime role that
# web, worker and beat connect as. `skinscan migrate` (as the owner, POSTGRES_USER) grants it its privileges.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -v app_password="$DB_APP_PASSWORD" <<'SQL'
CREATE ROLE skinscan_app LOGIN PASSWORD :'app_password';
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
