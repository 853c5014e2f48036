-- pgwarden DDL log and auto-tracking: event triggers (creating them needs a superuser).
-- Placeholders as in history.sql: {schema}, {owner}, {schema_name}.

-- After every DDL command: record it, and track new tables that match a history.tables pattern.
CREATE OR REPLACE FUNCTION {schema}.on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    cmd record;
    r record;
    tr record;
    setting record;
BEGIN
    FOR cmd IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() LOOP
        INSERT INTO {schema}.ddl_log (db_user, role_name, application, client_addr, command_tag,
            object_type, schema_name, object_identity, statement)
        VALUES (pg_catalog.session_user()::text, {schema}.acting_role(),
            pg_catalog.current_setting('application_name'), pg_catalog.inet_client_addr(),
            cmd.command_tag, cmd.object_type, cmd.schema_name, cmd.object_identity,
            pg_catalog.current_query());

        -- RENAME COLUMN reports the object as a 'table column' of the table (objid).
        CONTINUE WHEN cmd.object_type NOT IN ('table', 'table column')
            OR cmd.command_tag NOT IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO',
                                       'ALTER TABLE')
            OR cmd.schema_name = {schema_name}
            OR COALESCE(pg_catalog.current_setting('pgwarden.in_track', true), '') = 'on';

        -- A tracked table whose key changed (or a renamed key column): refresh its triggers.
        SELECT t.* INTO tr FROM {schema}.tracked t WHERE t.table_oid = cmd.objid;
        IF FOUND THEN
            IF {schema}.trigger_state(cmd.objid) = 'stale'
               AND {schema}.key_columns(cmd.objid) IS NOT NULL THEN
                PERFORM {schema}.track(cmd.objid::regclass, tr.mode, tr.exclude_columns,
                                       tr.truncate_mode, tr.source);
            END IF;
            CONTINUE;
        END IF;
        CONTINUE WHEN cmd.object_type <> 'table';

        SELECT ru.* INTO r FROM {schema}.rule ru, pg_catalog.pg_class c
        WHERE c.oid = cmd.objid
          AND cmd.schema_name OPERATOR(pg_catalog.~) ru.schema_regex
          AND c.relname::text OPERATOR(pg_catalog.~) ru.table_regex
        ORDER BY ru.pattern LIMIT 1;
        CONTINUE WHEN NOT FOUND;

        IF {schema}.key_columns(cmd.objid) IS NULL THEN
            -- ALTER TABLE … ADD PRIMARY KEY later fires this trigger again and tracks it then.
            RAISE WARNING 'pgwarden: % matches history pattern % but has no primary key; '
                          'it is not tracked until it has one', cmd.object_identity, r.pattern;
            CONTINUE;
        END IF;
        SELECT s.* INTO setting FROM {schema}.table_setting s, pg_catalog.pg_class c
        WHERE c.oid = cmd.objid AND s.schema_name = cmd.schema_name
          AND s.table_name = c.relname::text;
        PERFORM {schema}.track(cmd.objid::regclass,
            COALESCE(setting.mode, r.mode),
            COALESCE(setting.exclude_columns, '{{}}'::text[]),
            COALESCE(setting.truncate_mode, r.truncate_mode),
            'rule');
    END LOOP;
END
$body$;

-- After DROP: record it; a dropped tracked table leaves `tracked` (its history stays).
CREATE OR REPLACE FUNCTION {schema}.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    obj record;
BEGIN
    FOR obj IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects() LOOP
        CONTINUE WHEN NOT obj.original;
        INSERT INTO {schema}.ddl_log (db_user, role_name, application, client_addr, command_tag,
            object_type, schema_name, object_identity, statement)
        VALUES (pg_catalog.session_user()::text, {schema}.acting_role(),
            pg_catalog.current_setting('application_name'), pg_catalog.inet_client_addr(),
            TG_TAG, obj.object_type, obj.schema_name, obj.object_identity,
            pg_catalog.current_query());
        IF obj.object_type = 'table' THEN
            DELETE FROM {schema}.tracked t WHERE t.table_oid = obj.objid;
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
