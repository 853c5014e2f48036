-- Migration 0003: capture from the WAL (history.capture: wal), beside the triggers. Both
-- engines write the same history tables; what the WAL engine needs besides:
--   * which engine captures each table, and what new tables a pattern tracks get;
--   * who: the WAL carries the transaction id and commit time, not the role, so db_user and
--     role_name are NULL where the application sent no context message (the tx table keeps
--     its nine columns: the compiled trigger checks them);
--   * per history table: the relation it follows in the WAL (kept after a DROP, whose
--     earlier changes may still be on their way), the LSN capture started at, and the
--     columns, by attribute number, that the stream sends for it at the consumer's position;
--   * the consumer's progress, stored in the same transaction as the events it wrote;
--   * gaps: WAL that history lost (a slot invalidated in fail-open mode), from LSN to LSN.

SET LOCAL ROLE {owner};

ALTER TABLE {schema}.tracked
    ADD COLUMN capture text NOT NULL DEFAULT 'trigger' CHECK (capture IN ('trigger', 'wal'));
ALTER TABLE {schema}.table_setting
    ADD COLUMN capture text CHECK (capture IN ('trigger', 'wal'));

ALTER TABLE {schema}.tx ALTER COLUMN db_user DROP NOT NULL;
ALTER TABLE {schema}.tx ALTER COLUMN role_name DROP NOT NULL;

ALTER TABLE {schema}.logged_table
    ADD COLUMN wal_relid oid,
    ADD COLUMN wal_from pg_lsn,
    ADD COLUMN wal_attnums int2[];

CREATE TABLE {schema}.wal_progress (
    slot text PRIMARY KEY,
    lsn pg_lsn NOT NULL,
    at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);

CREATE TABLE {schema}.wal_gap (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot text NOT NULL,
    from_lsn pg_lsn NOT NULL,
    to_lsn pg_lsn NOT NULL,
    at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    reason text NOT NULL
);
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.wal_gap
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_change();

RESET ROLE;
