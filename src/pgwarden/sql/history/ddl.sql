-- pgwarden DDL log, auto-tracking, and history tables that follow their tables: event
-- triggers (creating them needs a superuser). Placeholders as in base.sql.

-- After every DDL command: record it; bring a changed tracked table's history table, capture
-- and key indexes up to date (track.sql, refresh); track new tables that match a
-- history.tables pattern.
CREATE OR REPLACE FUNCTION {schema}.on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    cmd record;
    r record;
    setting record;
    ours boolean := COALESCE(pg_catalog.current_setting('pgwarden.in_track', true), '') = 'on';
BEGIN
    FOR cmd IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() LOOP
        -- pgwarden's own maintenance of its history tables is not a schema change of the
        -- user's: not logged, and must not recurse.
        CONTINUE WHEN ours AND cmd.schema_name = {schema_name};
        INSERT INTO {schema}.ddl_log (db_user, role_name, application, client_addr, command_tag,
            object_type, schema_name, object_identity, statement)
        VALUES (pg_catalog.session_user()::text, {schema}.acting_role(),
            pg_catalog.current_setting('application_name'), pg_catalog.inet_client_addr(),
            cmd.command_tag, cmd.object_type, cmd.schema_name, cmd.object_identity,
            pg_catalog.current_query());
        IF NOT ours AND cmd.command_tag = 'ALTER PUBLICATION' THEN
            PERFORM {schema}.wal_guard(cmd.command_tag, NULL);
        ELSIF NOT ours AND cmd.command_tag = 'ALTER TABLE' AND cmd.object_type = 'table' THEN
            PERFORM {schema}.wal_guard(cmd.command_tag, cmd.objid);
        END IF;

        -- RENAME COLUMN reports the object as a 'table column' of the table (objid).
        CONTINUE WHEN cmd.object_type NOT IN ('table', 'table column')
            OR cmd.command_tag NOT IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO',
                                       'ALTER TABLE')
            OR cmd.schema_name = {schema_name}
            OR ours;

        IF EXISTS (SELECT 1 FROM {schema}.tracked t WHERE t.table_oid = cmd.objid) THEN
            PERFORM {schema}.refresh(cmd.objid);
            CONTINUE;
        END IF;
        CONTINUE WHEN cmd.object_type <> 'table'
            OR cmd.command_tag NOT IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO');

        SELECT ru.* INTO r FROM {schema}.rule ru, pg_catalog.pg_class c
        WHERE c.oid = cmd.objid AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND cmd.schema_name OPERATOR(pg_catalog.~) ru.schema_regex
          AND c.relname::text OPERATOR(pg_catalog.~) ru.table_regex
        ORDER BY ru.pattern LIMIT 1;
        CONTINUE WHEN NOT FOUND;
        SELECT s.* INTO setting FROM {schema}.table_setting s, pg_catalog.pg_class c
        WHERE c.oid = cmd.objid AND s.schema_name = cmd.schema_name
          AND s.table_name = c.relname::text;
        PERFORM {schema}.track(cmd.objid::regclass,
            COALESCE(setting.mode, r.mode),
            COALESCE(setting.exclude_columns, '{{}}'::text[]),
            COALESCE(setting.truncate_mode, r.truncate_mode),
            'rule', setting.capture);
    END LOOP;
END
$body$;

-- After DROP: record it; a dropped tracked table is no longer tracked (its history stays).
-- History columns dropped as a side effect of something else (DROP TYPE ... CASCADE of a type
-- some history still holds) are refused: that would erase history without a word.
CREATE OR REPLACE FUNCTION {schema}.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    obj record;
BEGIN
    FOR obj IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects() LOOP
        IF NOT obj.original AND obj.object_type = 'table column'
           AND obj.schema_name = {schema_name}
           AND COALESCE(pg_catalog.current_setting('pgwarden.in_track', true), '') <> 'on' THEN
            RAISE EXCEPTION 'pgwarden: % would drop history column %', TG_TAG, obj.object_identity
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = 'history still holds values of that type; keep the type';
        END IF;
        -- ALTER PUBLICATION ... DROP TABLE / SET TABLE removes publication relations: a
        -- drop, seen here and not at ddl_command_end.
        IF obj.object_type = 'publication relation'
           AND COALESCE(pg_catalog.current_setting('pgwarden.in_track', true), '') <> 'on' THEN
            PERFORM {schema}.wal_guard(TG_TAG, NULL);
        END IF;
        IF obj.object_type = 'publication' AND obj.object_name = {schema}.wal_publication()
           AND EXISTS (SELECT 1 FROM {schema}.tracked k WHERE k.capture = 'wal') THEN
            RAISE EXCEPTION 'pgwarden: % would stop history capture from the WAL (publication %)',
                TG_TAG, obj.object_name
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = 'switch those tables to history.capture: trigger (or untrack them) '
                             'and run `pgwarden apply` first';
        END IF;
        CONTINUE WHEN NOT obj.original;
        INSERT INTO {schema}.ddl_log (db_user, role_name, application, client_addr, command_tag,
            object_type, schema_name, object_identity, statement)
        VALUES (pg_catalog.session_user()::text, {schema}.acting_role(),
            pg_catalog.current_setting('application_name'), pg_catalog.inet_client_addr(),
            TG_TAG, obj.object_type, obj.schema_name, obj.object_identity,
            pg_catalog.current_query());
        IF obj.object_type = 'table' THEN
            PERFORM {schema}.forget(obj.objid);
        END IF;
    END LOOP;
END
$body$;

REVOKE ALL ON FUNCTION {schema}.on_ddl_end() FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.on_sql_drop() FROM PUBLIC;

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgwarden_ddl_end') THEN
        CREATE EVENT TRIGGER pgwarden_ddl_end ON ddl_command_end
            EXECUTE FUNCTION {schema}.on_ddl_end();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgwarden_sql_drop') THEN
        CREATE EVENT TRIGGER pgwarden_sql_drop ON sql_drop
            EXECUTE FUNCTION {schema}.on_sql_drop();
    END IF;
END
$do$;
ALTER EVENT TRIGGER pgwarden_ddl_end ENABLE ALWAYS;
ALTER EVENT TRIGGER pgwarden_sql_drop ENABLE ALWAYS;
