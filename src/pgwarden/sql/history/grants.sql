-- pgwarden history: who may run which function. Applied after the other function files.
--
-- Nobody but the history owner and the installing role may run history's functions: a
-- function that writes history (context_id, write_rows, the capture functions) run by anyone
-- else would forge it. Capture triggers need no EXECUTE right to fire, and the functions they
-- call run as the owner, which owns them all.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {schema} FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {owner};

-- The functions that write history run as its owner (SECURITY DEFINER), never as the role
-- that installed them.
ALTER FUNCTION {schema}.note_failure(oid, text, text, text, text, text) OWNER TO {owner};
ALTER FUNCTION {schema}.context_id(bigint) OWNER TO {owner};
ALTER FUNCTION {schema}.write_rows(int, "char", bigint, bigint) OWNER TO {owner};
ALTER FUNCTION {schema}.acting_role() OWNER TO {owner};
ALTER FUNCTION {schema}.forbid_change() OWNER TO {owner};

-- Reading: the SQL of an event's JSON columns (read.sql). It reads the column map with the
-- caller's rights, so only roles that may read history (the auditor) get anything from it.
GRANT EXECUTE ON FUNCTION {schema}.json_as_text(int2, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.image_sql(int, "char", text, int2[]) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.event_sql(int, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.view_part(int) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.events(int) TO PUBLIC;
-- Checking capture (`verify`, the UI's overview): catalog reads and history's own tables, with
-- the caller's rights, so an auditor can tell that capture is off without any other right.
GRANT EXECUTE ON FUNCTION {schema}.trigger_state(oid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.wal_slot() TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.wal_publication() TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.capture_source(int) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.capture_args(int) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.live_slots(int) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.native_args(int) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.key_attnums(oid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.key_columns(oid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.storage_type(oid, int) TO PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.engine() TO PUBLIC;
