-- pgwarden-backups.json, as `pgwarden up` writes it: whose archive a backup location is.
-- Run by the Kubernetes backup job (psql, against the server it backs up).
SELECT pg_catalog.json_build_object(
    'format', 1,
    'system_identifier', s.system_identifier::pg_catalog.text,
    'pg_major', pg_catalog.current_setting('server_version_num')::pg_catalog.int4 / 10000,
    'wal_segment_size', i.bytes_per_wal_segment,
    'data_checksums', i.data_page_checksum_version <> 0
)
FROM pg_catalog.pg_control_system() AS s, pg_catalog.pg_control_init() AS i;
