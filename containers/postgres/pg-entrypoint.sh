#!/bin/sh
# First start: initdb in $PGDATA with POSTGRES_USER / POSTGRES_PASSWORD, create POSTGRES_DB.
# Every start: run the server in the foreground (PID 1), listening on every address.
#
# Streaming replication (a province's primary and its synchronous standby):
#   PG_PRIMARY_HOST         set on a standby: its first start copies the primary
#                           (pg_basebackup, as POSTGRES_USER) and it then follows it
#   PG_APPLICATION_NAME     the name a standby reports to its primary (default: hostname)
#   PG_SYNC_STANDBY_NAMES   set on a primary: `synchronous_standby_names`, e.g.
#                           'FIRST 1 (pg_13_b)'. A commit returns once that standby has the
#                           WAL on disk too (synchronous_commit stays on): a commit the node
#                           answered survives the primary's loss. A promoted standby runs
#                           without one (nothing to wait for) until a new standby is named.
# Every server accepts replication connections (scram-sha-256, like every other one).
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PG_PRIMARY_HOST:=}"
: "${PG_APPLICATION_NAME:=$(cat /proc/sys/kernel/hostname)}"
: "${PG_SYNC_STANDBY_NAMES:=}"
: "${PG_WAIT_S:=120}"

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ "${1:-postgres}" != postgres ]; then
    exec "$@"
fi

# A standby's first start: wait for the primary (bounded), copy it, follow it.
if [ ! -s "$PGDATA/PG_VERSION" ] && [ -n "$PG_PRIMARY_HOST" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required on the first start of a standby}"
    export PGPASSWORD="$POSTGRES_PASSWORD"
    waited=0
    until pg_isready -q -h "$PG_PRIMARY_HOST" -U "$POSTGRES_USER" -d postgres; do
        waited=$((waited + 1))
        if [ "$waited" -gt "$PG_WAIT_S" ]; then
            echo "pg-entrypoint: the primary $PG_PRIMARY_HOST did not answer in ${PG_WAIT_S} s" >&2
            exit 1
        fi
        sleep 1
    done
    pg_basebackup -h "$PG_PRIMARY_HOST" -U "$POSTGRES_USER" -D "$PGDATA" \
        --wal-method=stream --checkpoint=fast --write-recovery-conf
    chmod 700 "$PGDATA"
    # The recovery settings pg_basebackup wrote, with the name the primary waits for.
    printf "primary_conninfo = 'host=%s port=5432 user=%s password=%s application_name=%s'\n" \
        "$PG_PRIMARY_HOST" "$POSTGRES_USER" "$POSTGRES_PASSWORD" "$PG_APPLICATION_NAME" \
        >> "$PGDATA/postgresql.auto.conf"
    unset PGPASSWORD
    echo "pg-entrypoint: standby of $PG_PRIMARY_HOST as $PG_APPLICATION_NAME"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "pg-entrypoint: POSTGRES_PASSWORD is required on first start" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 \
        --no-instructions >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
        psql -v ON_ERROR_STOP=1 -q --username="$POSTGRES_USER" --dbname=postgres \
            -v db="$POSTGRES_DB" <<'SQL'
CREATE DATABASE :"db";
SQL
        pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    fi
    echo "pg-entrypoint: initialised $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
fi
shift || true
if [ -n "$PG_SYNC_STANDBY_NAMES" ]; then
    set -- -c synchronous_standby_names="$PG_SYNC_STANDBY_NAMES" "$@"
fi
# wal_keep_size: a standby that was away a little while catches up from the primary's WAL.
exec postgres -D "$PGDATA" -c listen_addresses='*' -c wal_keep_size=256MB \
    -c cluster_name="$PG_APPLICATION_NAME" "$@"
