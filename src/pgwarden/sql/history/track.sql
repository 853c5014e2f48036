-- pgwarden history: what is tracked and how its history table follows it. Functions only;
-- placeholders as in base.sql.
--
-- A table's history table (rows_<id>) has one pair of columns (old, new) per column of the
-- table and *generation*: a column gets a new generation when its type changes or when it is
-- captured again after being excluded, so values keep the type they were written in. Columns
-- are known by their attribute number, which survives renames; logged_column holds each
-- generation's name (the column's current name, or its last one once dropped), storage type
-- and the statement ids it was written between (since, until). A reader knows from an event's
-- statement id which columns the table had then. The DDL event trigger (ddl.sql) calls
-- refresh() after every ALTER TABLE, so this happens by itself; `pgwarden apply` does the same
-- where event triggers cannot be installed (they need a superuser).

-- A logged_table row and its (empty) history table. relid is NULL for the history of a table
-- that no longer exists (migrating 0.1's history).
CREATE OR REPLACE FUNCTION {schema}.create_history_table(relid oid, nsp text, rel text)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    log int;
    v_shadow text;
    reader oid;
BEGIN
    INSERT INTO {schema}.logged_table (table_oid, schema_name, table_name, shadow)
    VALUES (relid, nsp, rel, '') RETURNING id INTO log;
    v_shadow := 'rows_' || log;
    UPDATE {schema}.logged_table l SET shadow = v_shadow WHERE l.id = log;
    EXECUTE pg_catalog.format(
        'CREATE TABLE {schema}.%I (ctx bigint NOT NULL, stmt bigint NOT NULL, op "char" NOT NULL)',
        v_shadow);
    -- Events of one transaction (revert, --tx), of a time range, after a statement: context
    -- and statement ids grow as rows are appended, so BRIN finds them for little per write.
    -- A BRIN index built on an empty table summarizes its first range, and every insert into
    -- a summarized range rewrites the summary (about 13k instructions, against 4k when the
    -- range is left for autosummarize to do once it is full): hence the desummarize.
    EXECUTE pg_catalog.format('CREATE INDEX %I ON {schema}.%I USING brin (ctx, stmt) '
                              'WITH (autosummarize = on)', v_shadow || '_brin', v_shadow);
    PERFORM pg_catalog.brin_desummarize_range(
        pg_catalog.format('{schema}.%I', v_shadow || '_brin')::regclass, 0);
    EXECUTE pg_catalog.format('ALTER TABLE {schema}.%I OWNER TO {owner}', v_shadow);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.%I '
        'FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_change()', v_shadow);
    -- Whoever may read history (the tx table) may read this too: the auditor role reads a
    -- table tracked after the last `apply` without another one.
    FOR reader IN
        SELECT a.grantee FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
        WHERE c.oid = '{schema}.tx'::regclass AND a.privilege_type = 'SELECT'
          AND a.grantee <> c.relowner
    LOOP
        EXECUTE pg_catalog.format('GRANT SELECT ON {schema}.%I TO %s', v_shadow,
            CASE WHEN reader = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(reader)) END);
    END LOOP;
    RETURN log;
END
$body$;

-- The logged_table row and history table of a table, made the first time it is tracked. Kept
-- when it is no longer tracked and when it is dropped: history outlives both.
CREATE OR REPLACE FUNCTION {schema}.register(relid oid) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    log int;
    nsp text;
    rel text;
BEGIN
    SELECT n.nspname, c.relname INTO nsp, rel
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = relid;
    SELECT l.id INTO log FROM {schema}.logged_table l WHERE l.table_oid = relid;
    IF NOT FOUND THEN
        RETURN {schema}.create_history_table(relid, nsp, rel);
    END IF;
    UPDATE {schema}.logged_table l SET schema_name = nsp, table_name = rel, view_sql = NULL
    WHERE l.id = log AND (l.schema_name, l.table_name) IS DISTINCT FROM (nsp, rel);
    RETURN log;
END
$body$;

-- Bring the column map of a history table up to date with its table. Returns whether anything
-- changed. `since_all`: the `since` of columns added now (migrating older history: 0, so that
-- events written before cover them too); else a new statement id, which orders the change
-- against every write: writers of the table wait for the DDL that brought us here.
CREATE OR REPLACE FUNCTION {schema}.sync_columns(log int, excluded text[],
                                                  since_all bigint DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    t record;
    a record;
    cur record;
    boundary bigint;
    changed boolean := false;
    g int2;
BEGIN
    SELECT * INTO t FROM {schema}.logged_table l WHERE l.id = log;
    FOR a IN
        SELECT att.attnum, att.attname::text AS attname,
               {schema}.storage_type(att.atttypid, att.atttypmod) AS stype
        FROM pg_catalog.pg_attribute att
        WHERE att.attrelid = t.table_oid AND att.attnum > 0 AND NOT att.attisdropped
        ORDER BY att.attnum
    LOOP
        SELECT * INTO cur FROM {schema}.logged_column c
        WHERE c.log_id = log AND c.attnum = a.attnum AND c.until IS NULL;
        IF FOUND AND cur.name <> a.attname THEN
            -- Renamed: every generation shows the column's current name.
            UPDATE {schema}.logged_column c SET name = a.attname
            WHERE c.log_id = log AND c.attnum = a.attnum;
            changed := true;
        END IF;
        IF a.attname = ANY (COALESCE(excluded, '{{}}')) THEN
            IF cur.gen IS NOT NULL THEN
                boundary := COALESCE(boundary, since_all, {schema}.boundary(log));
                UPDATE {schema}.logged_column c SET until = boundary
                WHERE c.log_id = log AND c.attnum = a.attnum AND c.gen = cur.gen;
                changed := true;
            END IF;
            CONTINUE;
        END IF;
        CONTINUE WHEN cur.gen IS NOT NULL AND cur.type = a.stype;
        boundary := COALESCE(boundary, since_all, {schema}.boundary(log));
        IF cur.gen IS NOT NULL THEN
            UPDATE {schema}.logged_column c SET until = boundary
            WHERE c.log_id = log AND c.attnum = a.attnum AND c.gen = cur.gen;
        END IF;
        g := COALESCE((SELECT pg_catalog.max(c.gen) FROM {schema}.logged_column c
                       WHERE c.log_id = log AND c.attnum = a.attnum), 0) + 1;
        INSERT INTO {schema}.logged_column (log_id, attnum, gen, name, type, old_col, new_col,
                                            since)
        VALUES (log, a.attnum, g, a.attname, a.stype, pg_catalog.format('o%s_%s', a.attnum, g),
                pg_catalog.format('n%s_%s', a.attnum, g), boundary);
        EXECUTE pg_catalog.format('ALTER TABLE {schema}.%I ADD COLUMN %I %s, ADD COLUMN %I %s',
            t.shadow, pg_catalog.format('o%s_%s', a.attnum, g), a.stype,
            pg_catalog.format('n%s_%s', a.attnum, g), a.stype);
        changed := true;
    END LOOP;
    -- Dropped from the table: its history stays, written no more.
    FOR cur IN
        SELECT c.* FROM {schema}.logged_column c
        WHERE c.log_id = log AND c.until IS NULL AND c.attnum > 0
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute att
                          WHERE att.attrelid = t.table_oid AND att.attnum = c.attnum
                            AND NOT att.attisdropped)
    LOOP
        boundary := COALESCE(boundary, since_all, {schema}.boundary(log));
        UPDATE {schema}.logged_column c SET until = boundary
        WHERE c.log_id = log AND c.attnum = cur.attnum AND c.gen = cur.gen;
        changed := true;
    END LOOP;
    IF boundary <> 0 THEN
        INSERT INTO {schema}.shape_change (log_id, stmt) VALUES (log, boundary);
    END IF;
    IF changed THEN
        UPDATE {schema}.logged_table l SET view_sql = NULL WHERE l.id = log;
    END IF;
    RETURN changed;
END
$body$;

-- The history table's key index, for the table's key as it is now (primary key, else replica
-- identity index; none for a table without either): on the key after each change, the new
-- one (or the old one, for a delete). An UPDATE that moved a row to a new key is found under
-- the new key and names the old one, so a row's life is followed back from its last key.
-- Rebuilt when the key or its columns' generation changes.
CREATE OR REPLACE FUNCTION {schema}.refresh_keys(log int) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    t record;
    want int2[];
    slots text[];
    olds text[];
    news text[];
BEGIN
    SELECT * INTO t FROM {schema}.logged_table l WHERE l.id = log;
    want := {schema}.key_attnums(t.table_oid);
    SELECT pg_catalog.array_agg(c.old_col ORDER BY k.ord), pg_catalog.array_agg(c.new_col ORDER BY k.ord)
    INTO olds, news
    FROM pg_catalog.unnest(want) WITH ORDINALITY AS k(attnum, ord)
    JOIN {schema}.logged_column c ON c.log_id = log AND c.attnum = k.attnum AND c.until IS NULL;
    IF want IS NOT NULL AND pg_catalog.cardinality(olds) IS DISTINCT FROM pg_catalog.cardinality(want) THEN
        RAISE EXCEPTION 'pgwarden: a key column of %.% is not captured', t.schema_name, t.table_name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    slots := olds || news;
    IF want IS NOT DISTINCT FROM t.key_attnums AND slots IS NOT DISTINCT FROM t.key_slots THEN
        RETURN false;
    END IF;
    EXECUTE pg_catalog.format('DROP INDEX IF EXISTS {schema}.%I', t.shadow || '_key');
    IF want IS NOT NULL THEN
        EXECUTE pg_catalog.format('CREATE INDEX %I ON {schema}.%I (%s)', t.shadow || '_key',
            t.shadow,
            (SELECT pg_catalog.string_agg(pg_catalog.format('(COALESCE(%I, %I))', news[i], olds[i]), ', ')
             FROM pg_catalog.generate_series(1, pg_catalog.cardinality(olds)) AS i));
    END IF;
    UPDATE {schema}.logged_table l SET key_attnums = want, key_slots = slots, view_sql = NULL
    WHERE l.id = log;
    IF t.key_slots IS NOT NULL OR want IS DISTINCT FROM t.key_attnums THEN
        INSERT INTO {schema}.shape_change (log_id, stmt) VALUES (log, {schema}.boundary(log));
    END IF;
    RETURN true;
END
$body$;

-- Which function the INSERT/UPDATE/DELETE triggers of a table call, and with what arguments.
-- TRUNCATE always calls the table's PL/pgSQL function; its argument is a hash of that
-- function's source, so that a stale function shows as a stale trigger.
CREATE OR REPLACE FUNCTION {schema}.engine() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN (SELECT m.value FROM {schema}.meta m WHERE m.key = 'engine') = 'c'
                     AND pg_catalog.to_regprocedure('{schema}.capture_native()') IS NOT NULL
                THEN 'c' ELSE 'plpgsql' END
$$;

CREATE OR REPLACE FUNCTION {schema}.capture_args(log int) RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN {schema}.engine() = 'c' THEN {schema}.native_args(log)
                ELSE ARRAY[pg_catalog.md5({schema}.capture_source(log))] END
$$;

CREATE OR REPLACE FUNCTION {schema}.install_capture(log int) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    t record;
    fn text := pg_catalog.format('{schema}.%I', 'capture_' || log);
    src text := {schema}.capture_source(log);
    args text[];
    call text;
    hash text := pg_catalog.md5(src);
BEGIN
    SELECT * INTO t FROM {schema}.logged_table l WHERE l.id = log;
    EXECUTE pg_catalog.format('CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql '
        'SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L', fn, src);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s() OWNER TO {owner}', fn);
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', fn);
    args := {schema}.capture_args(log);
    call := CASE WHEN {schema}.engine() = 'c' THEN '{schema}.capture_native' ELSE fn END
            || '(' || (SELECT pg_catalog.string_agg(pg_catalog.quote_literal(a), ', ' ORDER BY i)
                       FROM pg_catalog.unnest(args) WITH ORDINALITY AS x(a, i)) || ')';
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER pgwarden_capture_insert AFTER INSERT ON %I.%I '
        'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s',
        t.schema_name, t.table_name, call);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER pgwarden_capture_update AFTER UPDATE ON %I.%I '
        'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT '
        'EXECUTE FUNCTION %s', t.schema_name, t.table_name, call);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER pgwarden_capture_delete AFTER DELETE ON %I.%I '
        'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION %s',
        t.schema_name, t.table_name, call);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER pgwarden_capture_truncate BEFORE TRUNCATE ON %I.%I '
        'FOR EACH STATEMENT EXECUTE FUNCTION %s(%L)', t.schema_name, t.table_name, fn, hash);
    -- ENABLE ALWAYS: session_replication_role = replica does not skip them.
    EXECUTE pg_catalog.format(
        'ALTER TABLE %I.%I ENABLE ALWAYS TRIGGER pgwarden_capture_insert, '
        'ENABLE ALWAYS TRIGGER pgwarden_capture_update, '
        'ENABLE ALWAYS TRIGGER pgwarden_capture_delete, '
        'ENABLE ALWAYS TRIGGER pgwarden_capture_truncate', t.schema_name, t.table_name);
END
$body$;

-- 'ok', 'missing' (a capture trigger is gone), 'disabled' (not ENABLE ALWAYS) or 'stale' (it
-- calls another function, or with other arguments, than the table's settings and columns
-- call for now; or the table's capture function was changed).
CREATE OR REPLACE FUNCTION {schema}.trigger_state(relid oid) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    log int := (SELECT l.id FROM {schema}.logged_table l WHERE l.table_oid = relid);
    fn oid;
    src text;
    want text[];
    found_count int;
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.tracked k WHERE k.table_oid = relid AND k.capture = 'wal') THEN
        -- Captured from the WAL: in the publication, with complete before-images, and no
        -- capture trigger left over.
        IF log IS NULL OR NOT EXISTS (
               SELECT 1 FROM pg_catalog.pg_publication_rel r JOIN pg_catalog.pg_publication p
               ON p.oid = r.prpubid WHERE p.pubname = {schema}.wal_publication() AND r.prrelid = relid)
           OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s
                          WHERE s.slot_name = {schema}.wal_slot()) THEN
            RETURN 'missing';
        END IF;
        IF (SELECT c.relreplident FROM pg_catalog.pg_class c WHERE c.oid = relid) <> 'f' THEN
            RETURN 'disabled';
        END IF;
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                   WHERE g.tgrelid = relid AND g.tgname LIKE 'pgwarden\_capture\_%') THEN
            RETURN 'stale';
        END IF;
        RETURN 'ok';
    END IF;
    SELECT pg_catalog.count(*) INTO found_count FROM pg_catalog.pg_trigger g
    WHERE g.tgrelid = relid AND g.tgname IN ('pgwarden_capture_insert', 'pgwarden_capture_update',
          'pgwarden_capture_delete', 'pgwarden_capture_truncate');
    IF log IS NULL OR found_count < 4 THEN
        RETURN 'missing';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
               WHERE g.tgrelid = relid AND g.tgname LIKE 'pgwarden\_capture\_%'
                 AND g.tgenabled <> 'A') THEN
        RETURN 'disabled';
    END IF;
    fn := pg_catalog.to_regprocedure(pg_catalog.format('{schema}.%I()', 'capture_' || log));
    src := {schema}.capture_source(log);
    IF fn IS NULL OR (SELECT p.prosrc FROM pg_catalog.pg_proc p WHERE p.oid = fn) <> src THEN
        RETURN 'stale';
    END IF;
    want := {schema}.capture_args(log);
    IF EXISTS (
        SELECT 1 FROM pg_catalog.pg_trigger g
        WHERE g.tgrelid = relid AND g.tgname LIKE 'pgwarden\_capture\_%'
          AND (g.tgfoid <> CASE WHEN g.tgname = 'pgwarden_capture_truncate' OR {schema}.engine() <> 'c'
                                THEN fn ELSE pg_catalog.to_regprocedure('{schema}.capture_native()') END
               OR (pg_catalog.regexp_split_to_array(pg_catalog.encode(g.tgargs, 'escape'),
                                                    '\\000'))[1:g.tgnargs]
                  IS DISTINCT FROM CASE WHEN g.tgname = 'pgwarden_capture_truncate'
                                        THEN ARRAY[pg_catalog.md5(src)] ELSE want END)) THEN
        RETURN 'stale';
    END IF;
    RETURN 'ok';
END
$body$;

-- Start tracking a table: its history table and column map, triggers (ENABLE ALWAYS), its
-- settings, and a snapshot of its rows when it was not tracked before. Returns the number of
-- rows in that snapshot.
CREATE OR REPLACE FUNCTION {schema}.track(
    relid regclass,
    track_mode text DEFAULT 'fail-closed',
    excluded text[] DEFAULT '{{}}',
    truncate_how text DEFAULT 'rows',
    requested_by text DEFAULT 'config',
    how text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    nsp text;
    rel text;
    kind "char";
    key_cols text[];
    was_tracked boolean;
    log int;
    snapshot bigint := 0;
    bad text;
    s bigint;
    was_wal boolean;
    capture text := COALESCE(how, (SELECT m.value FROM {schema}.meta m WHERE m.key = 'capture'),
                             'trigger');
BEGIN
    SELECT n.nspname, c.relname, c.relkind INTO nsp, rel, kind
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = relid;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'pgwarden: %.% is not a table', nsp, rel USING ERRCODE = 'wrong_object_type';
    END IF;
    key_cols := {schema}.key_columns(relid);
    SELECT c INTO bad FROM pg_catalog.unnest(excluded) AS c WHERE c = ANY (key_cols) LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgwarden: column % of %.% is part of its key and cannot be excluded',
            bad, nsp, rel USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT c INTO bad FROM pg_catalog.unnest(excluded) AS c
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid = relid AND a.attname = c AND NOT a.attisdropped)
    LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgwarden: %.% has no column % to exclude', nsp, rel, bad
            USING ERRCODE = 'undefined_column';
    END IF;

    -- The DDL this makes (history table, triggers) is pgwarden's own: the DDL log's
    -- auto-tracking and the DDL guard let it through.
    PERFORM pg_catalog.set_config('pgwarden.in_track', 'on', true);
    -- The lock the triggers need, taken before the first change to the table's catalog row
    -- (the GRANT below): a VACUUM or ANALYZE holding the table (autovacuum) then finishes
    -- first. Taken after, a wait for that ANALYZE (the publication change of wal_attach and
    -- wal_detach) could meet its wait for this transaction's catalog row: a deadlock.
    EXECUTE pg_catalog.format('LOCK TABLE %I.%I IN SHARE ROW EXCLUSIVE MODE', nsp, rel);
    was_tracked := EXISTS (SELECT 1 FROM {schema}.tracked t WHERE t.table_oid = relid);
    was_wal := EXISTS (SELECT 1 FROM {schema}.tracked t WHERE t.table_oid = relid AND t.capture = 'wal');
    log := {schema}.register(relid);
    INSERT INTO {schema}.tracked AS t
        (table_oid, schema_name, table_name, mode, exclude_columns, truncate_mode, source, log_id,
         capture)
    VALUES (relid, nsp, rel, track_mode, excluded, truncate_how, requested_by, log, capture)
    ON CONFLICT (table_oid) DO UPDATE
        SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
            mode = EXCLUDED.mode, exclude_columns = EXCLUDED.exclude_columns,
            truncate_mode = EXCLUDED.truncate_mode, log_id = EXCLUDED.log_id,
            capture = EXCLUDED.capture,
            source = CASE WHEN t.source = 'manual' AND EXCLUDED.source <> 'manual'
                          THEN t.source ELSE EXCLUDED.source END;
    PERFORM {schema}.sync_columns(log, excluded);
    PERFORM {schema}.refresh_keys(log);

    -- The history owner reads the table for snapshots and TRUNCATE rows.
    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA %I TO {owner}', nsp);
    EXECUTE pg_catalog.format('GRANT SELECT ON %I.%I TO {owner}', nsp, rel);
    IF capture = 'wal' THEN
        PERFORM {schema}.wal_attach(log);
        -- Settings changed on a table already captured from the WAL (placeholders): the
        -- consumer switches at this transaction's place in the stream.
        IF EXISTS (SELECT 1 FROM {schema}.logged_column c
                   WHERE c.log_id = log AND (c.since < 0 OR c.until < 0))
           OR EXISTS (SELECT 1 FROM {schema}.shape_change sc WHERE sc.log_id = log AND sc.stmt < 0) THEN
            PERFORM {schema}.wal_shape_changed(log, {schema}.wal_attnums(relid));
        END IF;
    ELSE
        IF was_wal THEN
            PERFORM {schema}.wal_detach(relid);
        END IF;
        PERFORM {schema}.install_capture(log);
    END IF;

    IF NOT was_tracked THEN
        -- CREATE TRIGGER holds a lock that blocks writers until commit, so this snapshot and
        -- the triggers see the same rows: nothing slips between them.
        s := pg_catalog.nextval('{schema}.statement_seq');
        snapshot := {schema}.write_rows(log, 'S', {schema}.context_id(s), s);
        UPDATE {schema}.tracked t SET since = pg_catalog.transaction_timestamp()
        WHERE t.table_oid = relid;
    END IF;
    PERFORM {schema}.set_view_part(log);
    PERFORM pg_catalog.set_config('pgwarden.in_track', '', true);
    RETURN snapshot;
END
$body$;

-- The capture triggers of a table and its PL/pgSQL capture function (log: NULL when it has
-- none), gone: untracked, or captured from the WAL from now on.
CREATE OR REPLACE FUNCTION {schema}.drop_capture(nsp text, rel text, log int) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgwarden_capture_insert ON %I.%I', nsp, rel);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgwarden_capture_update ON %I.%I', nsp, rel);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgwarden_capture_delete ON %I.%I', nsp, rel);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgwarden_capture_truncate ON %I.%I', nsp, rel);
    IF log IS NOT NULL THEN
        EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS {schema}.%I()', 'capture_' || log);
    END IF;
END
$body$;

-- Stop tracking a table; its history stays.
CREATE OR REPLACE FUNCTION {schema}.untrack(relid regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    nsp text;
    rel text;
    log int := (SELECT l.id FROM {schema}.logged_table l WHERE l.table_oid = relid);
BEGIN
    SELECT n.nspname, c.relname INTO nsp, rel
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = relid;
    PERFORM pg_catalog.set_config('pgwarden.in_track', 'on', true);
    PERFORM {schema}.wal_detach(relid);
    PERFORM {schema}.drop_capture(nsp, rel, log);
    DELETE FROM {schema}.tracked t WHERE t.table_oid = relid;
    PERFORM pg_catalog.set_config('pgwarden.in_track', '', true);
END
$body$;

-- After a schema change of a tracked table (the DDL event trigger, or `apply`): names, column
-- map, key indexes, capture function and triggers brought up to date. Returns whether any of
-- them had to change.
CREATE OR REPLACE FUNCTION {schema}.refresh(relid oid) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    tr record;
    log int;
    nsp text;
    rel text;
    changed boolean := false;
BEGIN
    SELECT * INTO tr FROM {schema}.tracked t WHERE t.table_oid = relid;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_catalog.set_config('pgwarden.in_track', 'on', true);
    SELECT n.nspname, c.relname INTO nsp, rel
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = relid;
    IF (tr.schema_name, tr.table_name) IS DISTINCT FROM (nsp, rel) THEN
        UPDATE {schema}.tracked t SET schema_name = nsp, table_name = rel WHERE t.table_oid = relid;
        changed := true;
    END IF;
    log := {schema}.register(relid);
    changed := {schema}.sync_columns(log, tr.exclude_columns) OR changed;
    changed := {schema}.refresh_keys(log) OR changed;
    -- Disabled or dropped triggers are not quietly put back here: `verify`, `plan` and the DDL
    -- guard deal with those.
    IF tr.capture = 'wal' THEN
        IF {schema}.trigger_state(relid) = 'stale' THEN
            PERFORM {schema}.wal_attach(log);
        END IF;
        IF changed THEN
            PERFORM {schema}.wal_shape_changed(log, {schema}.wal_attnums(relid));
            PERFORM {schema}.set_view_part(log);
        END IF;
    ELSIF changed OR {schema}.trigger_state(relid) = 'stale' THEN
        PERFORM {schema}.install_capture(log);
        PERFORM {schema}.set_view_part(log);
        changed := true;
    END IF;
    PERFORM pg_catalog.set_config('pgwarden.in_track', '', true);
    RETURN changed;
END
$body$;

-- A tracked table was dropped: it is no longer tracked; its history stays, under its last
-- name (the DDL event trigger calls this).
CREATE OR REPLACE FUNCTION {schema}.forget(relid oid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    log int := (SELECT l.id FROM {schema}.logged_table l WHERE l.table_oid = relid);
    wal boolean := {schema}.is_wal(log);
    b bigint;
BEGIN
    IF log IS NOT NULL THEN
        b := {schema}.boundary(log);
    END IF;
    DELETE FROM {schema}.tracked t WHERE t.table_oid = relid;
    IF log IS NULL THEN
        RETURN;
    END IF;
    PERFORM pg_catalog.set_config('pgwarden.in_track', 'on', true);
    UPDATE {schema}.logged_table l
    SET table_oid = NULL, dropped_stmt = b, view_sql = NULL
    WHERE l.id = log;
    IF wal THEN
        -- Its changes before the DROP may still be on their way: the consumer closes its
        -- columns when it gets here.
        PERFORM {schema}.wal_shape_changed(log, NULL);
    END IF;
    UPDATE {schema}.logged_column c
    SET until = (SELECT l.dropped_stmt FROM {schema}.logged_table l WHERE l.id = log)
    WHERE c.log_id = log AND c.until IS NULL;
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS {schema}.%I()', 'capture_' || log);
    PERFORM {schema}.set_view_part(log);
    PERFORM pg_catalog.set_config('pgwarden.in_track', '', true);
END
$body$;
