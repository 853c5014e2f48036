-- pgwarden-backup.json for a base backup taken by the Kubernetes backup job: the record
-- `pgwarden backup create` writes, so `pgwarden backup list | verify | restore` read both alike.
-- psql variables: label, backup_label (the file's text), stop_lsn and timeline (from the
-- backup_manifest's last WAL range), size (bytes). Run right after pg_basebackup returned, so
-- now() is no earlier than the moment the backup became consistent.
WITH backup_label AS (
    SELECT
        pg_catalog.substring(:'backup_label', 'START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+)')
            AS start_lsn,
        pg_catalog.substring(:'backup_label', 'START TIME: ([^\n]+)') AS start_time,
        pg_catalog.substring(:'backup_label', 'START TIMELINE: ([0-9]+)') AS timeline
)
SELECT pg_catalog.json_build_object(
    'label', :'label',
    'kind', 'full',
    'parent', NULL,
    'timeline', COALESCE(NULLIF(:'timeline', ''), b.timeline)::pg_catalog.int4,
    'start_lsn', b.start_lsn,
    'stop_lsn', :'stop_lsn',
    'start_time', pg_catalog.to_char(
        b.start_time::pg_catalog.timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'),
    'stop_time', pg_catalog.to_char(
        pg_catalog.now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
    'size_bytes', (:'size')::pg_catalog.int8,
    'system_identifier', s.system_identifier::pg_catalog.text,
    'pg_major', pg_catalog.current_setting('server_version_num')::pg_catalog.int4 / 10000,
    'pg_version', pg_catalog.current_setting('server_version'),
    'data_checksums', i.data_page_checksum_version <> 0,
    'format', 'plain'
)
FROM backup_label AS b, pg_catalog.pg_control_system() AS s, pg_catalog.pg_control_init() AS i;
