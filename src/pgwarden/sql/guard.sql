-- pgwarden DDL guard (access.ddl_guard: true): event triggers, so installing it needs a superuser.
-- Placeholders: {schema}, {owner}, {schema_name} as in history/base.sql.
--
-- Rejects, from every role, managers and superusers included, unless pgwarden itself does it
-- (untrack, apply):
--   * anything that leaves a tracked table's capture triggers disabled, renamed or missing;
-- and from roles that are neither the manager role (or acting as it) nor superusers:
--   * DDL on objects in the managed schemas (a table created there later included),
--   * any DDL or DROP on pgwarden's own history objects.
-- It runs at ddl_command_end / sql_drop: raising there rolls the whole command back.

SET LOCAL ROLE {owner};
CREATE TABLE IF NOT EXISTS {schema}.guarded_schema (
    schema_name text PRIMARY KEY
);
RESET ROLE;

-- The role whose rights a DDL command used: SET ROLE if any, else the login role.
CREATE OR REPLACE FUNCTION {schema}.guard_allows(acting text) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = acting AND r.rolsuper)
        OR acting = (SELECT m.value FROM {schema}.meta m WHERE m.key = 'manager_role')
$$;

CREATE OR REPLACE FUNCTION {schema}.guard_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    cmd record;
    acting text := {schema}.acting_role();
    manager text := (SELECT m.value FROM {schema}.meta m WHERE m.key = 'manager_role');
    ours boolean := COALESCE(pg_catalog.current_setting('pgwarden.in_track', true), '') = 'on';
    relid oid;
BEGIN
    -- Stopping capture is a different power from changing a table's structure: the manager
    -- role may do the one, nobody may do the other but pgwarden itself (untrack, or the
    -- config applied), whoever they are.
    IF NOT ours THEN
        FOR cmd IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands()
                   WHERE object_type IN ('table', 'trigger') LOOP
            relid := CASE WHEN cmd.object_type = 'trigger'
                          THEN (SELECT g.tgrelid FROM pg_catalog.pg_trigger g WHERE g.oid = cmd.objid)
                          ELSE cmd.objid END;
            IF EXISTS (SELECT 1 FROM {schema}.tracked t
                       WHERE t.table_oid = relid
                         AND {schema}.trigger_state(t.table_oid) IN ('missing', 'disabled')) THEN
                RAISE EXCEPTION 'pgwarden: % on % would switch off its change history',
                    cmd.command_tag, cmd.object_identity
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'to stop recording a table, `pgwarden untrack` it (or take it out '
                                 'of history.tables and `pgwarden apply`)';
            END IF;
        END LOOP;
    END IF;
    IF {schema}.guard_allows(acting) THEN
        RETURN;
    END IF;
    FOR cmd IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() LOOP
        -- pgwarden's own history tables follow the tables they record (track.sql), on behalf
        -- of whoever changed such a table; nobody else holds privileges on this schema, so
        -- setting the flag gains nobody anything.
        IF cmd.schema_name = {schema_name}
           AND COALESCE(pg_catalog.current_setting('pgwarden.in_track', true), '') <> 'on' THEN
            RAISE EXCEPTION 'pgwarden: % on % is not allowed: history objects belong to pgwarden',
                cmd.command_tag, cmd.object_identity
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF cmd.schema_name IN (SELECT g.schema_name FROM {schema}.guarded_schema g) THEN
            RAISE EXCEPTION 'pgwarden: % on % needs the % role (acting as %)',
                cmd.command_tag, cmd.object_identity, manager, acting
                USING ERRCODE = 'insufficient_privilege',
                      HINT = pg_catalog.format('members of %s run SET ROLE %s first', manager, manager);
        END IF;
    END LOOP;
END
$body$;

CREATE OR REPLACE FUNCTION {schema}.guard_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    obj record;
    acting text := {schema}.acting_role();
    manager text := (SELECT m.value FROM {schema}.meta m WHERE m.key = 'manager_role');
BEGIN
    -- A capture trigger dropped by itself (not with its table) stops history: nobody but
    -- pgwarden may (see guard_ddl_end).
    IF COALESCE(pg_catalog.current_setting('pgwarden.in_track', true), '') <> 'on' THEN
        FOR obj IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects()
                   WHERE object_type = 'trigger' AND original LOOP
            IF obj.object_identity LIKE 'pgwarden\_capture\_%' THEN
                RAISE EXCEPTION 'pgwarden: dropping % would switch off change history',
                    obj.object_identity USING ERRCODE = 'insufficient_privilege',
                    HINT = 'to stop recording a table, `pgwarden untrack` it (or take it out '
                           'of history.tables and `pgwarden apply`)';
            END IF;
        END LOOP;
    END IF;
    IF {schema}.guard_allows(acting) THEN
        RETURN;
    END IF;
    FOR obj IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects() LOOP
        IF obj.schema_name = {schema_name}
           AND COALESCE(pg_catalog.current_setting('pgwarden.in_track', true), '') <> 'on' THEN
            RAISE EXCEPTION 'pgwarden: dropping % is not allowed: history objects belong to pgwarden',
                obj.object_identity USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF obj.original AND obj.schema_name IN (SELECT g.schema_name FROM {schema}.guarded_schema g)
        THEN
            RAISE EXCEPTION 'pgwarden: dropping % needs the % role (acting as %)',
                obj.object_identity, manager, acting USING ERRCODE = 'insufficient_privilege';
        END IF;
    END LOOP;
END
$body$;

REVOKE ALL ON FUNCTION {schema}.guard_ddl_end() FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.guard_sql_drop() FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.guard_allows(text) FROM PUBLIC;

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgwarden_guard_end') THEN
        CREATE EVENT TRIGGER pgwarden_guard_end ON ddl_command_end
            EXECUTE FUNCTION {schema}.guard_ddl_end();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgwarden_guard_drop') THEN
        CREATE EVENT TRIGGER pgwarden_guard_drop ON sql_drop
            EXECUTE FUNCTION {schema}.guard_sql_drop();
    END IF;
END
$do$;
ALTER EVENT TRIGGER pgwarden_guard_end ENABLE ALWAYS;
ALTER EVENT TRIGGER pgwarden_guard_drop ENABLE ALWAYS;
