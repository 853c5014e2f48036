#!/bin/sh
# A base backup into the backup volume, in the layout `pgwarden backup` reads (the statefulset
# flavor's CronJob runs this in the postgres image). The server archives its WAL into
# $BACKUP_ROOT/wal itself (basic_archive); this adds backups/<label>/data with its manifest and
# the pgwarden-backup.json record, written last: a backup without it is not listed as one.
# Connection: the libpq variables (PGHOST, PGPORT, PGUSER, PGPASSWORD) in the environment.
set -eu
root=${BACKUP_ROOT:?BACKUP_ROOT is not set}
scripts=${PGWARDEN_SCRIPTS:-/scripts}
id_of() { sed -n 's/.*"system_identifier" *: *"\([0-9]*\)".*/\1/p' | head -n 1; }

mkdir -p "$root/wal" "$root/backups"
claim=$(psql -XAtq -v ON_ERROR_STOP=1 -d postgres -f "$scripts/claim.sql")
if [ -f "$root/pgwarden-backups.json" ]; then
    have=$(id_of < "$root/pgwarden-backups.json")
    want=$(printf '%s\n' "$claim" | id_of)
    if [ "$have" != "$want" ]; then
        echo "pgwarden backup: $root holds the archive of another cluster (system identifier" \
             "$have; this one is $want); nothing written" >&2
        exit 2
    fi
else
    printf '%s\n' "$claim" > "$root/.pgwarden-backups.json.tmp"
    mv "$root/.pgwarden-backups.json.tmp" "$root/pgwarden-backups.json"
fi

label=$(date -u +%Y%m%dT%H%M%SZ)
dir="$root/backups/$label"
mkdir "$dir"  # fails, writing nothing, if a backup of that second exists
trap 'rm -rf "$dir"' EXIT  # our own half-written copy, on any failure
# Who writes it: a prune elsewhere leaves a backup being written alone (removed below).
printf '{"host": "%s", "pid": %d, "started": "%s"}\n' "$(cat /proc/sys/kernel/hostname)" $$ \
    "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" > "$dir/pgwarden-writing.json"
pg_basebackup -D "$dir/data" -X stream -c fast -l "pgwarden $label" -d "dbname=postgres"
manifest="$dir/data/backup_manifest"
stop_lsn=$(grep -o '"End-LSN": *"[0-9A-F/]*"' "$manifest" | tail -n 1 | sed 's/.*"\([0-9A-F/]*\)"$/\1/')
timeline=$(grep -o '"Timeline": *[0-9]*' "$manifest" | tail -n 1 | sed 's/.*: *//')
size=$(du -sb "$dir/data" | cut -f 1)
psql -XAtq -v ON_ERROR_STOP=1 -d postgres -v label="$label" \
    -v backup_label="$(cat "$dir/data/backup_label")" -v stop_lsn="$stop_lsn" \
    -v timeline="$timeline" -v size="$size" -f "$scripts/describe.sql" \
    > "$dir/.pgwarden-backup.json.tmp"
sync "$dir/.pgwarden-backup.json.tmp" 2>/dev/null || sync
mv "$dir/.pgwarden-backup.json.tmp" "$dir/pgwarden-backup.json"
rm -f "$dir/pgwarden-writing.json"
trap - EXIT
echo "pgwarden backup: $label written to $dir"
