-- Migration 0002: history in native rows, one history table per tracked table, who and when
-- once per transaction (see capture.sql for the layout). The events of 0.1's JSON event table
-- are converted, every one of them kept: values go into native columns of the table's current
-- type where they convert, and into jsonb columns of their own where they do not (a column
-- since dropped, renamed or retyped, or a table since dropped). Runs after the functions of
-- this release are installed, which it uses.

SET LOCAL ROLE {owner};

-- Who and when: one row per transaction and context (acting role, application, actor,
-- context); id: the statement id that opened it. Found by transaction id or time through
-- BRIN (both grow as rows are appended).
CREATE TABLE {schema}.tx (
    id bigint PRIMARY KEY,
    tx bigint NOT NULL,
    at timestamptz NOT NULL,
    db_user text NOT NULL,
    role_name text NOT NULL,
    application text,
    client_addr inet,
    app_user text,
    context text
);
CREATE INDEX tx_brin ON {schema}.tx USING brin (tx, at) WITH (autosummarize = on);
-- Unsummarized, so that inserts do not rewrite the first range's summary (track.sql says why).
SELECT pg_catalog.brin_desummarize_range('{schema}.tx_brin'::regclass, 0);

-- Statement text (history.record_statement only).
CREATE TABLE {schema}.statement (
    stmt bigint PRIMARY KEY,
    ctx bigint NOT NULL,
    at timestamptz NOT NULL,
    text text
);

-- Every table that has history, tracked now or not, existing or dropped.
CREATE TABLE {schema}.logged_table (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_oid oid UNIQUE,            -- NULL once dropped
    schema_name text NOT NULL,       -- current name, or the last one
    table_name text NOT NULL,
    shadow text NOT NULL,            -- its history table in this schema: rows_<id>
    key_attnums int2[],              -- key columns (NULL: the whole row is its identity)
    key_slots text[],                -- history columns the key indexes are on (old..., new...)
    dropped_stmt bigint,
    view_sql text                    -- its part of the `event` view (read.sql)
);

-- Its columns by attribute number and generation (see track.sql). attnum < 0: a column known
-- only from 0.1's JSON history, kept as jsonb.
CREATE TABLE {schema}.logged_column (
    log_id int NOT NULL REFERENCES {schema}.logged_table (id),
    attnum int2 NOT NULL,
    gen int2 NOT NULL,
    name text NOT NULL,
    type text NOT NULL,
    old_col text NOT NULL,
    new_col text NOT NULL,
    since bigint NOT NULL,           -- written by statements with ids in [since, until)
    until bigint,
    PRIMARY KEY (log_id, attnum, gen)
);

-- Where replaying a table's history starts again: a snapshot (S, tracking started) or a
-- TRUNCATE (T rows, X marker).
CREATE TABLE {schema}.reset (
    log_id int NOT NULL REFERENCES {schema}.logged_table (id),
    stmt bigint NOT NULL,
    ctx bigint NOT NULL,
    kind "char" NOT NULL,
    PRIMARY KEY (log_id, stmt)
);

-- When a table's columns or key changed (its history table followed): rewinding across such a
-- change is refused, the live rows no longer having the shape the events describe.
CREATE TABLE {schema}.shape_change (
    log_id int NOT NULL REFERENCES {schema}.logged_table (id),
    stmt bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT pg_catalog.transaction_timestamp()
);
CREATE INDEX shape_change_log ON {schema}.shape_change (log_id, at);

ALTER TABLE {schema}.tracked ADD COLUMN log_id int REFERENCES {schema}.logged_table (id);

-- Append-only, as the history tables are (forbid_change, common.sql).
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.tx
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.statement
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_change();
DROP TRIGGER IF EXISTS ddl_log_append_only ON {schema}.ddl_log;
DROP TRIGGER IF EXISTS ddl_log_no_truncate ON {schema}.ddl_log;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.ddl_log
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.capture_failure
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_change();
RESET ROLE;

-- 0.1's deferred statements get their events first, with 0.1's own function.
DO $migrate$
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.deferred)
       AND pg_catalog.to_regprocedure('{schema}.materialize()') IS NOT NULL THEN
        PERFORM {schema}.materialize();
    END IF;
END
$migrate$;

-- 0.1 knew columns by name only. A column renamed since keeps its history: its earlier name
-- in older events is rewritten to the name it has now, from 0.1's DDL log (the rename's
-- statement text gives the old name; its object identity the new one).
DO $migrate$
DECLARE
    r record;
    m text[];
BEGIN
    ALTER TABLE {schema}.event DISABLE TRIGGER USER;  -- 0.1's append-only guard, this once
    FOR r IN
        SELECT d.at, d.statement, d.object_identity,
               (pg_catalog.parse_ident(d.object_identity))[3] AS new_name,
               c.oid AS relid
        FROM {schema}.ddl_log d
        JOIN pg_catalog.pg_namespace n
          ON n.nspname = (pg_catalog.parse_ident(d.object_identity))[1]
        JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid
          AND c.relname = (pg_catalog.parse_ident(d.object_identity))[2]
        WHERE d.object_type = 'table column' AND d.command_tag = 'ALTER TABLE'
          AND d.statement ~* 'rename'
        ORDER BY d.id
    LOOP
        FOR m IN SELECT pg_catalog.regexp_matches(r.statement,
                 'rename\s+(?:column\s+)?("(?:[^"]|"")+"|[^\s;]+)\s+to\s+("(?:[^"]|"")+"|[^\s;]+)', 'gi')
        LOOP
            m := ARRAY[(pg_catalog.parse_ident(m[1]))[1], (pg_catalog.parse_ident(m[2]))[1]];
            CONTINUE WHEN m[2] <> r.new_name;
            UPDATE {schema}.event e
            SET old_row = CASE WHEN e.old_row ? m[1] THEN (e.old_row OPERATOR(pg_catalog.-) m[1])
                               || pg_catalog.jsonb_build_object(m[2], e.old_row -> m[1])
                               ELSE e.old_row END,
                new_row = CASE WHEN e.new_row ? m[1] THEN (e.new_row OPERATOR(pg_catalog.-) m[1])
                               || pg_catalog.jsonb_build_object(m[2], e.new_row -> m[1])
                               ELSE e.new_row END
            WHERE e.table_oid = r.relid AND e.stmt_at < r.at
              AND (e.old_row ? m[1] OR e.new_row ? m[1]);
        END LOOP;
    END LOOP;
    ALTER TABLE {schema}.event ENABLE TRIGGER USER;
END
$migrate$;

-- Who and when, once per transaction and context.
INSERT INTO {schema}.tx (id, tx, at, db_user, role_name, application, client_addr, app_user,
                         context)
SELECT pg_catalog.min(e.stmt_id), e.tx, pg_catalog.min(e.tx_at), e.db_user, e.role_name,
       e.application, e.client_addr, e.app_user, e.context
FROM {schema}.event e
GROUP BY e.tx, e.db_user, e.role_name, e.application, e.client_addr, e.app_user, e.context;

INSERT INTO {schema}.statement (stmt, ctx, at, text)
SELECT DISTINCT ON (e.stmt_id) e.stmt_id, x.id, e.stmt_at, e.statement
FROM {schema}.event e
JOIN {schema}.tx x ON x.tx = e.tx AND x.db_user = e.db_user AND x.role_name = e.role_name
 AND x.application IS NOT DISTINCT FROM e.application
 AND x.client_addr IS NOT DISTINCT FROM e.client_addr
 AND x.app_user IS NOT DISTINCT FROM e.app_user AND x.context IS NOT DISTINCT FROM e.context
WHERE e.statement IS NOT NULL
ORDER BY e.stmt_id;

DO $migrate$
DECLARE
    src record;
    live oid;
    log int;
    shadow text;
    boundary bigint;
    k record;
    typed text;
    legacy int2;
    ok boolean;
    cols text;
    vals text;
    strip text[];
BEGIN
    PERFORM pg_catalog.set_config('pgwarden.in_track', 'on', true);
    boundary := pg_catalog.nextval('{schema}.statement_seq');
    FOR src IN
        SELECT DISTINCT ON (e.table_oid) e.table_oid, e.schema_name, e.table_name
        FROM {schema}.event e ORDER BY e.table_oid, e.stmt_id DESC
    LOOP
        -- The same table still there (an oid can be reused by a later table: the name must
        -- match too), else history of a table since dropped.
        SELECT c.oid INTO live FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = src.table_oid AND c.relkind IN ('r', 'p')
          AND (n.nspname, c.relname) = (src.schema_name, src.table_name);
        IF live IS NOT NULL THEN
            log := {schema}.register(live);
            PERFORM {schema}.sync_columns(log,
                (SELECT t.exclude_columns FROM {schema}.tracked t WHERE t.table_oid = live), 0);
            -- A column is in the events from the first one that recorded it: one added later,
            -- or excluded, or known to 0.1 only by an earlier name, is absent before (not NULL).
            UPDATE {schema}.logged_column c
            SET since = COALESCE((SELECT pg_catalog.min(e.stmt_id) FROM {schema}.event e
                                  WHERE e.table_oid = src.table_oid
                                    AND (e.old_row ? c.name OR e.new_row ? c.name)), boundary)
            WHERE c.log_id = log AND c.until IS NULL;
        ELSE
            log := {schema}.create_history_table(NULL, src.schema_name, src.table_name);
            UPDATE {schema}.logged_table l SET dropped_stmt = boundary WHERE l.id = log;
        END IF;
        SELECT l.shadow INTO shadow FROM {schema}.logged_table l WHERE l.id = log;

        -- A live column whose recorded values do not all convert to its type now keeps them in
        -- a jsonb generation of its own, until this migration; native from then on.
        FOR k IN
            SELECT c.attnum, c.name, c.type, c.gen, c.since FROM {schema}.logged_column c
            WHERE c.log_id = log AND c.until IS NULL AND c.since < boundary
        LOOP
            BEGIN
                EXECUTE pg_catalog.format(
                    'SELECT pg_catalog.count(x.v) FROM (SELECT (pg_catalog.jsonb_populate_record('
                    'NULL::%1$I.%2$I, pg_catalog.jsonb_build_object(%3$L, j))).%3$I AS v '
                    'FROM {schema}.event e, LATERAL (VALUES (e.old_row -> %3$L), '
                    '(e.new_row -> %3$L)) AS s(j) WHERE e.table_oid = $1 AND j IS NOT NULL) x',
                    src.schema_name, src.table_name, k.name) USING src.table_oid;
                ok := true;
            EXCEPTION WHEN OTHERS THEN
                ok := false;
            END;
            CONTINUE WHEN ok;
            UPDATE {schema}.logged_column c SET since = boundary
            WHERE c.log_id = log AND c.attnum = k.attnum AND c.gen = k.gen;
            legacy := -1 - COALESCE((SELECT pg_catalog.count(*)::int2 FROM {schema}.logged_column c
                                     WHERE c.log_id = log AND c.attnum < 0), 0);
            INSERT INTO {schema}.logged_column (log_id, attnum, gen, name, type, old_col, new_col,
                                                since, until)
            VALUES (log, legacy, 1, k.name, 'jsonb', pg_catalog.format('ox%s_1', -legacy),
                    pg_catalog.format('nx%s_1', -legacy), k.since, boundary);
        END LOOP;
        -- Keys no column of the table has now (dropped or renamed since, or all of them for a
        -- table since dropped): jsonb columns of their own, in the events from the first that
        -- recorded them to the last.
        FOR k IN
            SELECT j.key, pg_catalog.min(e.stmt_id) AS first, pg_catalog.max(e.stmt_id) AS last
            FROM {schema}.event e,
                LATERAL pg_catalog.jsonb_object_keys(COALESCE(e.old_row, '{{}}')
                                                     || COALESCE(e.new_row, '{{}}')) AS j(key)
            WHERE e.table_oid = src.table_oid
              AND NOT EXISTS (SELECT 1 FROM {schema}.logged_column c
                              WHERE c.log_id = log AND c.name = j.key)
            GROUP BY 1 ORDER BY 1
        LOOP
            legacy := -1 - COALESCE((SELECT pg_catalog.count(*)::int2 FROM {schema}.logged_column c
                                     WHERE c.log_id = log AND c.attnum < 0), 0);
            INSERT INTO {schema}.logged_column (log_id, attnum, gen, name, type, old_col, new_col,
                                                since, until)
            VALUES (log, legacy, 1, k.key, 'jsonb', pg_catalog.format('ox%s_1', -legacy),
                    pg_catalog.format('nx%s_1', -legacy), k.first, k.last + 1);
        END LOOP;
        FOR k IN
            SELECT c.old_col, c.new_col FROM {schema}.logged_column c
            WHERE c.log_id = log AND c.attnum < 0
              AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                              WHERE a.attrelid = pg_catalog.format('{schema}.%I', shadow)::regclass
                                AND a.attname = c.old_col)
        LOOP
            EXECUTE pg_catalog.format('ALTER TABLE {schema}.%I ADD COLUMN %I jsonb, ADD COLUMN %I jsonb',
                                      shadow, k.old_col, k.new_col);
        END LOOP;

        -- The events: native columns through the table's row type (without the keys kept as
        -- jsonb, which would not convert), jsonb ones as recorded.
        strip := ARRAY(SELECT c.name FROM {schema}.logged_column c
                       WHERE c.log_id = log AND c.attnum < 0);
        SELECT pg_catalog.string_agg(pg_catalog.format(', %I, %I', c.old_col, c.new_col), ''),
               pg_catalog.string_agg(CASE WHEN c.attnum > 0
                   THEN pg_catalog.format(', CASE WHEN e.old_row ? %1$L THEN o.%2$I END, '
                                          'CASE WHEN e.new_row ? %1$L THEN n.%2$I END', c.name, c.name)
                   ELSE pg_catalog.format(', e.old_row -> %1$L, e.new_row -> %1$L', c.name) END, '')
        INTO cols, vals
        FROM {schema}.logged_column c
        WHERE c.log_id = log AND c.since < boundary;
        EXECUTE pg_catalog.format(
            'INSERT INTO {schema}.%I (ctx, stmt, op%s) '
            'SELECT x.id, e.stmt_id, CASE e.op WHEN ''INSERT'' THEN ''I'' WHEN ''UPDATE'' THEN ''U'' '
            ' WHEN ''DELETE'' THEN ''D'' WHEN ''SNAPSHOT'' THEN ''S'' '
            ' ELSE CASE WHEN e.row_key IS NULL THEN ''X'' ELSE ''T'' END END%s '
            'FROM {schema}.event e '
            'JOIN {schema}.tx x ON x.tx = e.tx AND x.db_user = e.db_user AND x.role_name = e.role_name'
            ' AND x.application IS NOT DISTINCT FROM e.application'
            ' AND x.client_addr IS NOT DISTINCT FROM e.client_addr'
            ' AND x.app_user IS NOT DISTINCT FROM e.app_user AND x.context IS NOT DISTINCT FROM e.context'
            '%s WHERE e.table_oid = $1 ORDER BY e.stmt_id, e.id',
            shadow, COALESCE(cols, ''), COALESCE(vals, ''),
            CASE WHEN live IS NOT NULL THEN pg_catalog.format(
                ' LEFT JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::%1$I.%2$I,'
                ' e.old_row OPERATOR(pg_catalog.-) $2) o ON true'
                ' LEFT JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::%1$I.%2$I,'
                ' e.new_row OPERATOR(pg_catalog.-) $2) n ON true',
                src.schema_name, src.table_name) ELSE '' END)
        USING src.table_oid, strip;
        INSERT INTO {schema}.reset (log_id, stmt, ctx, kind)
        SELECT DISTINCT ON (e.stmt_id) log, e.stmt_id, x.id,
               CASE WHEN e.op = 'SNAPSHOT' THEN 'S' WHEN e.row_key IS NULL THEN 'X' ELSE 'T' END
        FROM {schema}.event e
        JOIN {schema}.tx x ON x.tx = e.tx AND x.db_user = e.db_user AND x.role_name = e.role_name
         AND x.application IS NOT DISTINCT FROM e.application
         AND x.client_addr IS NOT DISTINCT FROM e.client_addr
         AND x.app_user IS NOT DISTINCT FROM e.app_user AND x.context IS NOT DISTINCT FROM e.context
        WHERE e.table_oid = src.table_oid AND e.op IN ('SNAPSHOT', 'TRUNCATE')
        ORDER BY e.stmt_id;
        IF live IS NOT NULL THEN
            PERFORM {schema}.refresh_keys(log);
            UPDATE {schema}.tracked t SET log_id = log WHERE t.table_oid = live;
        END IF;
    END LOOP;
    PERFORM pg_catalog.set_config('pgwarden.in_track', '', true);
END
$migrate$;

-- 0.1's capture and its JSON storage go (their triggers with them: every tracked table gets
-- the new ones right after this migration).
DROP FUNCTION IF EXISTS {schema}.capture() CASCADE;
DROP FUNCTION IF EXISTS {schema}.capture_truncate() CASCADE;
DROP FUNCTION IF EXISTS {schema}.materialize();
DROP FUNCTION IF EXISTS {schema}.bulk_insert(text);
DROP FUNCTION IF EXISTS {schema}.write_table_rows(oid, text);
DROP FUNCTION IF EXISTS {schema}.key_expression(text[], text);
DROP FUNCTION IF EXISTS {schema}.rows_as_of(oid, timestamptz);
DROP FUNCTION IF EXISTS {schema}.rows_before(oid, timestamptz);
DROP FUNCTION IF EXISTS {schema}.rewind_blocker(oid, timestamptz);
DROP FUNCTION IF EXISTS {schema}.ensure_partitions(int);
DROP FUNCTION IF EXISTS {schema}.set_defer_rows(bigint);
DROP FUNCTION IF EXISTS {schema}.capture_args(oid);
DROP VIEW IF EXISTS {schema}.table_event;
DROP TABLE IF EXISTS {schema}.deferred;
DO $migrate$
DECLARE
    spool text;
BEGIN
    FOR spool IN SELECT c.relname FROM pg_catalog.pg_class c
                 WHERE c.relnamespace = '{schema}'::regnamespace AND c.relname LIKE 'spool\_%'
                   AND c.relkind = 'r'
    LOOP
        EXECUTE pg_catalog.format('DROP TABLE {schema}.%I', spool);
    END LOOP;
END
$migrate$;
DROP TABLE {schema}.event;

-- Plain SQL over the new history, in place of the old table: SELECT ... FROM {schema}.event
-- ORDER BY stmt_id, pos (read.sql, events()).
CREATE VIEW {schema}.event AS SELECT * FROM {schema}.events();
ALTER VIEW {schema}.event OWNER TO {owner};
