-- pgwarden change history: schema, tables and functions. Idempotent: applied on every install.
-- Placeholders: {schema} (the history schema) and {owner} (its NOLOGIN owner role), filled in by
-- psycopg.sql as quoted identifiers; {schema_name} is the schema as a string literal. Literal
-- braces are doubled.
--
-- Design notes
-- * Capture is statement-level: AFTER triggers with transition tables write one set-based INSERT
--   per statement. fail-open wraps that one INSERT in one EXCEPTION block, so at most one
--   subtransaction per statement, never one per row.
-- * UPDATE pairs old and new rows by their position in the transition tables: PostgreSQL appends
--   the old and the new image of each updated row together, so the n-th old row and the n-th new
--   row are the same row, even when the update changed its primary key.
-- * Every function that runs on behalf of application roles is SECURITY DEFINER, pins
--   search_path to pg_catalog, pg_temp and qualifies every name.

CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {owner};
ALTER SCHEMA {schema} OWNER TO {owner};
REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;

SET LOCAL ROLE {owner};

CREATE TABLE IF NOT EXISTS {schema}.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);

-- One row per changed row. Partitioned by transaction time so retention drops whole partitions.
CREATE TABLE IF NOT EXISTS {schema}.event (
    id bigint GENERATED ALWAYS AS IDENTITY,
    stmt_id bigint NOT NULL,
    tx bigint NOT NULL,  -- pg_current_xact_id() as a number: BRIN-indexable (xid8 is not)
    tx_at timestamptz NOT NULL,
    stmt_at timestamptz NOT NULL,
    table_oid oid NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    op text NOT NULL,
    row_key jsonb,
    key_hash bigint,
    old_row jsonb,
    new_row jsonb,
    db_user text NOT NULL,
    role_name text NOT NULL,
    application text,
    client_addr inet,
    app_user text,
    context text,
    statement text
) PARTITION BY RANGE (tx_at);

CREATE TABLE IF NOT EXISTS {schema}.event_default PARTITION OF {schema}.event DEFAULT;

-- One number per capturing statement: orders events of one statement apart from the next, which
-- event ids alone cannot do when one statement moves a key that another row then takes.
CREATE SEQUENCE IF NOT EXISTS {schema}.statement_seq;

-- How a row is found by its key. A b-tree on (table, hash of the key) costs a random index
-- insert per row, about one extra write per changed row; for a 100k-row statement that was a
-- quarter of pgwarden's overhead. So only the events of small statements ('s', up to 1,000
-- rows) are indexed that way. A bulk statement writes its rows in key-hash order, so the
-- (stmt_id, key_hash) index of bulk events only ever grows at its right edge (as cheap as a
-- serial primary key), and marks its first row 'h' (head): a lookup probes each bulk statement
-- of the table once ('b' is every other row of a bulk statement). Added in place to older
-- installs.
ALTER TABLE {schema}.event ADD COLUMN IF NOT EXISTS kind "char" NOT NULL DEFAULT 's';
DROP INDEX IF EXISTS {schema}.event_row_idx;
CREATE INDEX IF NOT EXISTS event_small_key_idx ON {schema}.event (table_oid, key_hash)
    WHERE kind = 's';
CREATE INDEX IF NOT EXISTS event_bulk_key_idx ON {schema}.event (stmt_id, key_hash)
    WHERE kind <> 's';
CREATE INDEX IF NOT EXISTS event_bulk_head_idx ON {schema}.event (table_oid, stmt_id)
    WHERE kind = 'h';
-- Every event of one table, by index rather than by scanning all history: filter it on
-- table_oid (and anything else). Small statements' events come from their (table, key hash)
-- index, bulk statements' from their heads, one (stmt_id, key_hash) index range each (joining on
-- tx_at too would prune partitions, but then the planner reads the statement through the BRIN
-- index instead, measured 8 times slower). The join arm returns the head's table_oid, stmt_id and
-- tx_at (the same for every row of a statement) so that filters on them reach the head index.
CREATE OR REPLACE VIEW {schema}.table_event AS
    SELECT e.id, e.stmt_id, e.tx, e.tx_at, e.stmt_at, e.table_oid, e.schema_name, e.table_name,
           e.op, e.row_key, e.key_hash, e.old_row, e.new_row, e.db_user, e.role_name,
           e.application, e.client_addr, e.app_user, e.context, e.statement, e.kind
    FROM {schema}.event e
    WHERE e.kind = 's'
  UNION ALL
    SELECT b.id, hd.stmt_id, b.tx, hd.tx_at, b.stmt_at, hd.table_oid, b.schema_name, b.table_name,
           b.op, b.row_key, b.key_hash, b.old_row, b.new_row, b.db_user, b.role_name,
           b.application, b.client_addr, b.app_user, b.context, b.statement, b.kind
    FROM {schema}.event hd
    JOIN {schema}.event b ON b.stmt_id = hd.stmt_id AND b.kind <> 's'
    WHERE hd.kind = 'h';
ALTER VIEW {schema}.table_event OWNER TO {owner};

-- revert TX: every event of one transaction. Transaction ids grow with the order events are
-- written, so a BRIN index finds them for nearly nothing per row (a b-tree cost about 10% of a
-- bulk write).
CREATE INDEX IF NOT EXISTS event_tx_brin ON {schema}.event USING brin (tx);
-- --since / --until and as-of scans: BRIN is nearly free to maintain on append-only data.
CREATE INDEX IF NOT EXISTS event_at_idx ON {schema}.event USING brin (tx_at);

-- What is tracked, and how. `source` says who asked: the config (apply manages these), a
-- `pgwarden track` command, or a pattern rule matched by a table created later.
CREATE TABLE IF NOT EXISTS {schema}.tracked (
    table_oid oid PRIMARY KEY,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    mode text NOT NULL DEFAULT 'fail-closed' CHECK (mode IN ('fail-closed', 'fail-open')),
    exclude_columns text[] NOT NULL DEFAULT '{{}}',
    truncate_mode text NOT NULL DEFAULT 'rows' CHECK (truncate_mode IN ('rows', 'marker')),
    source text NOT NULL DEFAULT 'config' CHECK (source IN ('config', 'manual', 'rule')),
    since timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Patterns from history.tables: tables created later that match are tracked by the DDL trigger.
CREATE TABLE IF NOT EXISTS {schema}.rule (
    pattern text PRIMARY KEY,
    schema_regex text NOT NULL,
    table_regex text NOT NULL,
    mode text NOT NULL CHECK (mode IN ('fail-closed', 'fail-open')),
    truncate_mode text NOT NULL DEFAULT 'rows' CHECK (truncate_mode IN ('rows', 'marker'))
);

-- history.exclude_columns and per-table overrides, by name, for tables that do not exist yet.
CREATE TABLE IF NOT EXISTS {schema}.table_setting (
    schema_name text NOT NULL,
    table_name text NOT NULL,
    mode text CHECK (mode IN ('fail-closed', 'fail-open')),
    exclude_columns text[] NOT NULL DEFAULT '{{}}',
    truncate_mode text NOT NULL DEFAULT 'rows' CHECK (truncate_mode IN ('rows', 'marker')),
    PRIMARY KEY (schema_name, table_name)
);

-- fail-open statements whose history could not be written.
CREATE TABLE IF NOT EXISTS {schema}.capture_failure (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    tx xid8 NOT NULL,
    table_oid oid NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    op text NOT NULL,
    sqlstate text,
    message text
);

-- Deferred bulk statements (opt in with the setting pgwarden.defer_rows, see docs/history.md):
-- a statement over that many rows copies its rows, in their own column types, into a spool
-- table of its own, which costs about one plain write per row instead of building JSON. Its
-- events are written from the spool by materialize(), which every reader runs first. This is
-- the statement's metadata until then, taken when it ran.
CREATE TABLE IF NOT EXISTS {schema}.deferred (
    stmt_id bigint PRIMARY KEY,
    spool text NOT NULL,  -- a table in this schema: "pgwarden$side", "pgwarden$ord", the columns
    tx bigint NOT NULL,
    tx_at timestamptz NOT NULL,
    stmt_at timestamptz NOT NULL,
    table_oid oid NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    op text NOT NULL,
    key_columns text[] NOT NULL,
    db_user text NOT NULL,
    role_name text NOT NULL,
    application text,
    client_addr inet,
    app_user text,
    context text,
    statement text
);

-- Schema changes: who, when, what.
CREATE TABLE IF NOT EXISTS {schema}.ddl_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    tx xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    db_user text NOT NULL,
    role_name text NOT NULL,
    application text,
    client_addr inet,
    command_tag text NOT NULL,
    object_type text,
    schema_name text,
    object_identity text,
    statement text
);

RESET ROLE;

-- The role whose privileges apply outside any SECURITY DEFINER function: SET ROLE if used, else
-- the login role. (Inside our definer functions current_user is the history owner.)
CREATE OR REPLACE FUNCTION {schema}.acting_role() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN pg_catalog.current_setting('role') = 'none'
                THEN pg_catalog.session_user()::text
                ELSE pg_catalog.current_setting('role') END
$$;

-- Key columns of a table: its primary key, else its replica identity index.
CREATE OR REPLACE FUNCTION {schema}.key_columns(relid oid) RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
    FROM (
        SELECT i.indrelid, i.indkey
        FROM pg_catalog.pg_index i
        WHERE i.indrelid = relid AND (i.indisprimary OR i.indisreplident)
        ORDER BY i.indisprimary DESC
        LIMIT 1
    ) idx
    CROSS JOIN LATERAL pg_catalog.unnest(idx.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = idx.indrelid AND a.attnum = k.attnum
$$;

-- fail-open: the statement went through but its history did not. Say so and count it.
CREATE OR REPLACE FUNCTION {schema}.note_failure(relid oid, nsp text, rel text, op text,
                                                  err_state text, err_message text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    RAISE WARNING 'pgwarden: history of % on %.% was not recorded: %', op, nsp, rel, err_message
        USING HINT = 'fail-open mode: the change itself went through; see pgwarden verify';
    INSERT INTO {schema}.capture_failure (tx, table_oid, schema_name, table_name, op, sqlstate,
                                          message)
    VALUES (pg_catalog.pg_current_xact_id(), relid, nsp, rel, op, err_state, err_message);
END
$body$;

-- The INSERT that writes one bulk statement's events in key-hash order, with a head row (see
-- the event indexes). `source` is a query over the statement's rows giving k (the key), o and n
-- (the old and new images). Parameters: $1 the statement id, $2–$15 its metadata.
CREATE OR REPLACE FUNCTION {schema}.bulk_insert(source text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.format(
        'INSERT INTO {schema}.event (stmt_id, tx, tx_at, stmt_at, table_oid, schema_name,'
        ' table_name, op, row_key, key_hash, old_row, new_row, db_user, role_name,'
        ' application, client_addr, app_user, context, statement, kind)'
        ' SELECT $1, $2, $3, $4, $5, $6, $7, $8, x.k, x.h, x.o, x.n, $9, $10, $11, $12, $13,'
        ' $14, $15, CASE WHEN x.rn = 1 THEN ''h'' ELSE ''b'' END'
        ' FROM (SELECT y.*, pg_catalog.row_number() OVER (ORDER BY y.h) AS rn'
        ' FROM (SELECT z.k, pg_catalog.hashtextextended(z.k::text, 0) AS h, z.o, z.n'
        ' FROM (%s) z) y) x ORDER BY x.h', source)
$$;

-- The capture trigger for INSERT, UPDATE and DELETE (statement level, transition tables).
-- Static SQL throughout: plpgsql compiles one copy per table and caches each plan for the
-- session, so a one-row statement pays no parsing or planning. A branch that does not run is
-- never planned, which is why one function can name both transition tables. Each INSERT appears
-- twice, inside and outside a BEGIN … EXCEPTION block: plpgsql cannot make a handler conditional,
-- and fail-closed must not pay for (or be exposed to) a subtransaction at all.
CREATE OR REPLACE FUNCTION {schema}.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    -- Settings arrive as trigger arguments (mode, excluded columns, key columns, whether to
    -- record the statement), written by track(): no lookup at all per statement. Typed
    -- variables, not a record, so plpgsql keeps one cached plan per statement below.
    v_mode text := TG_ARGV[0];
    v_excluded text[] := COALESCE(TG_ARGV[1]::text[], '{{}}'::text[]);
    v_keys text[] := TG_ARGV[2]::text[];
    v_statement text;
    v_key1 text;
    v_nonkey text[];
    -- Who and when, computed once per statement (in the SELECT list they would run per row).
    v_tx bigint := pg_catalog.pg_current_xact_id()::text::bigint;
    v_tx_at timestamptz := pg_catalog.transaction_timestamp();
    v_stmt_at timestamptz := pg_catalog.statement_timestamp();
    v_db_user text := pg_catalog.session_user()::text;
    v_role text := CASE WHEN pg_catalog.current_setting('role') = 'none'
                        THEN pg_catalog.session_user()::text
                        ELSE pg_catalog.current_setting('role') END;
    v_application text := pg_catalog.current_setting('application_name');
    v_client_addr inet := pg_catalog.inet_client_addr();
    v_actor text := NULLIF(pg_catalog.current_setting('pgwarden.actor', true), '');
    v_context text := NULLIF(pg_catalog.current_setting('pgwarden.context', true), '');
    sid bigint;
    v_bulk boolean;
    v_query text;
    v_work_mem text;
    v_defer_setting text := pg_catalog.current_setting('pgwarden.defer_rows', true);
    v_defer boolean := false;
    v_spool text;
    v_coldefs text;
    v_cols text;
    v_copy_old text;
    v_copy_new text;
    err_state text;
    err_message text;
BEGIN
    IF TG_NARGS < 3 THEN  -- a trigger made by hand without arguments: whole keys from the catalog
        v_keys := {schema}.key_columns(TG_RELID);
    END IF;
    IF TG_ARGV[3] = 'on' THEN
        v_statement := pg_catalog.current_query();
    END IF;
    IF pg_catalog.cardinality(v_keys) = 1 THEN
        v_key1 := v_keys[1];  -- the common case: a one-column key, straight from the image
    ELSE
        -- A composite key: the image minus the other columns (read once per statement).
        v_nonkey := ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped
                            AND a.attname::text <> ALL (COALESCE(v_keys, '{{}}'::text[])));
    END IF;
    sid := pg_catalog.nextval('{schema}.statement_seq');
    -- A bulk statement (over 1,000 rows) writes its events in key-hash order with a head row
    -- (see the indexes on the event table). Its SQL is run with EXECUTE, planned once per
    -- statement, which is nothing next to its rows; the static INSERTs below, whose cached
    -- plans serve one-row statements, stay free of that sort and window.
    IF TG_OP = 'INSERT' THEN
        v_bulk := EXISTS (SELECT 1 FROM new_rows OFFSET 1000);
    ELSE
        v_bulk := EXISTS (SELECT 1 FROM old_rows OFFSET 1000);
    END IF;
    -- Deferred capture (opt in, pgwarden.defer_rows): see the `deferred` table.
    IF v_defer_setting IS NOT NULL AND v_defer_setting <> '' THEN
        IF v_defer_setting !~ '^[0-9]{{1,18}}$' THEN
            RAISE WARNING 'pgwarden: pgwarden.defer_rows = % is not a number of rows; ignored',
                v_defer_setting;
        ELSIF v_defer_setting::bigint > 0 THEN
            IF TG_OP = 'INSERT' THEN
                v_defer := EXISTS (SELECT 1 FROM new_rows OFFSET v_defer_setting::bigint - 1);
            ELSE
                v_defer := EXISTS (SELECT 1 FROM old_rows OFFSET v_defer_setting::bigint - 1);
            END IF;
        END IF;
    END IF;
    IF v_defer THEN
        -- The spool: the table's columns (not the excluded ones) in their own types, plus the
        -- side (old/new) and position that pair an UPDATE's images. A domain column is stored
        -- as its base type (a constraint added NOT VALID since must not refuse old rows; the
        -- JSON is the same). Captured inline instead: a table with a column named like ours,
        -- or with a column type this function's owner may not use (it creates the spool).
        SELECT pg_catalog.string_agg(pg_catalog.format('%I %s', a.attname,
                   CASE WHEN t.typtype = 'd' THEN pg_catalog.format_type(t.typbasetype, t.typtypmod)
                        ELSE pg_catalog.format_type(a.atttypid, a.atttypmod) END),
                   ', ' ORDER BY a.attnum),
               pg_catalog.string_agg(pg_catalog.format('r.%I', a.attname), ', ' ORDER BY a.attnum),
               NOT pg_catalog.bool_or(a.attname::text LIKE 'pgwarden$%')
               AND pg_catalog.bool_and(
                   pg_catalog.has_type_privilege(
                       CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END, 'USAGE')
                   AND pg_catalog.has_schema_privilege(
                       (SELECT b.typnamespace FROM pg_catalog.pg_type b
                        WHERE b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype
                                           ELSE a.atttypid END), 'USAGE'))
        INTO v_coldefs, v_cols, v_defer
        FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attname::text <> ALL (v_excluded);
    END IF;
    IF v_defer THEN
        v_spool := 'spool_' || sid;
        v_query := pg_catalog.format('CREATE TABLE {schema}.%I ("pgwarden$side" "char" NOT NULL,'
                                     ' "pgwarden$ord" bigint NOT NULL, %s)', v_spool, v_coldefs);
        IF TG_OP <> 'INSERT' THEN
            v_copy_old := pg_catalog.format('INSERT INTO {schema}.%I SELECT %L,'
                ' pg_catalog.row_number() OVER (), %s FROM old_rows r', v_spool, 'o', v_cols);
        END IF;
        IF TG_OP <> 'DELETE' THEN
            v_copy_new := pg_catalog.format('INSERT INTO {schema}.%I SELECT %L,'
                ' pg_catalog.row_number() OVER (), %s FROM new_rows r', v_spool, 'n', v_cols);
        END IF;
        -- The DDL guard lets pgwarden's own spool tables through (it checks this flag).
        PERFORM pg_catalog.set_config('pgwarden.spooling', 'on', true);
        IF v_mode = 'fail-open' THEN
            BEGIN
                EXECUTE v_query;
                EXECUTE COALESCE(v_copy_old, v_copy_new);
                IF v_copy_old IS NOT NULL AND v_copy_new IS NOT NULL THEN
                    EXECUTE v_copy_new;
                END IF;
                INSERT INTO {schema}.deferred VALUES (sid, v_spool, v_tx, v_tx_at, v_stmt_at,
                    TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, v_keys, v_db_user, v_role,
                    v_application, v_client_addr, v_actor, v_context, v_statement);
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT;
                PERFORM {schema}.note_failure(TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                                               err_state, err_message);
            END;
        ELSE
            EXECUTE v_query;
            EXECUTE COALESCE(v_copy_old, v_copy_new);
            IF v_copy_old IS NOT NULL AND v_copy_new IS NOT NULL THEN
                EXECUTE v_copy_new;
            END IF;
            INSERT INTO {schema}.deferred VALUES (sid, v_spool, v_tx, v_tx_at, v_stmt_at,
                TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, v_keys, v_db_user, v_role,
                v_application, v_client_addr, v_actor, v_context, v_statement);
        END IF;
        PERFORM pg_catalog.set_config('pgwarden.spooling', '', true);
        RETURN NULL;
    END IF;
    IF v_bulk THEN
        v_query := {schema}.bulk_insert(
            CASE TG_OP
            WHEN 'INSERT' THEN
                'SELECT CASE WHEN $16 IS NOT NULL'
                ' THEN pg_catalog.jsonb_build_object($16, j OPERATOR(pg_catalog.->) $16)'
                ' ELSE j OPERATOR(pg_catalog.-) $17 END AS k, NULL::jsonb AS o,'
                ' j OPERATOR(pg_catalog.-) $18 AS n'
                ' FROM (SELECT pg_catalog.to_jsonb(r) AS j FROM new_rows r OFFSET 0) i'
            WHEN 'DELETE' THEN
                'SELECT CASE WHEN $16 IS NOT NULL'
                ' THEN pg_catalog.jsonb_build_object($16, j OPERATOR(pg_catalog.->) $16)'
                ' ELSE j OPERATOR(pg_catalog.-) $17 END AS k,'
                ' j OPERATOR(pg_catalog.-) $18 AS o, NULL::jsonb AS n'
                ' FROM (SELECT pg_catalog.to_jsonb(r) AS j FROM old_rows r OFFSET 0) i'
            ELSE
                'SELECT CASE WHEN $16 IS NOT NULL'
                ' THEN pg_catalog.jsonb_build_object($16, nw.j OPERATOR(pg_catalog.->) $16)'
                ' ELSE nw.j OPERATOR(pg_catalog.-) $17 END AS k, od.img AS o, nw.img AS n'
                ' FROM (SELECT pg_catalog.to_jsonb(r) OPERATOR(pg_catalog.-) $18 AS img,'
                ' pg_catalog.row_number() OVER () AS pos FROM old_rows r) od'
                ' JOIN (SELECT j, j OPERATOR(pg_catalog.-) $18 AS img,'
                ' pg_catalog.row_number() OVER () AS pos'
                ' FROM (SELECT pg_catalog.to_jsonb(r) AS j FROM new_rows r OFFSET 0) q) nw'
                ' ON od.pos OPERATOR(pg_catalog.=) nw.pos'
                ' WHERE od.img IS DISTINCT FROM nw.img OFFSET 0'
            END);
        -- The sort gets memory for this statement only (set_config(..., true) until restored).
        v_work_mem := pg_catalog.current_setting('work_mem');
        PERFORM pg_catalog.set_config('work_mem', '64MB', true);
        IF v_mode = 'fail-open' THEN
            BEGIN
                EXECUTE v_query USING sid, v_tx, v_tx_at, v_stmt_at, TG_RELID, TG_TABLE_SCHEMA,
                    TG_TABLE_NAME, TG_OP, v_db_user, v_role, v_application, v_client_addr,
                    v_actor, v_context, v_statement, v_key1, v_nonkey, v_excluded;
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT;
                PERFORM {schema}.note_failure(TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                                               err_state, err_message);
            END;
        ELSE
            EXECUTE v_query USING sid, v_tx, v_tx_at, v_stmt_at, TG_RELID, TG_TABLE_SCHEMA,
                TG_TABLE_NAME, TG_OP, v_db_user, v_role, v_application, v_client_addr,
                v_actor, v_context, v_statement, v_key1, v_nonkey, v_excluded;
        END IF;
        PERFORM pg_catalog.set_config('work_mem', v_work_mem, true);
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF v_mode = 'fail-open' THEN
            BEGIN
            INSERT INTO {schema}.event (stmt_id, tx, tx_at, stmt_at, table_oid, schema_name,
                table_name, op, row_key, key_hash, old_row, new_row, db_user, role_name,
                application, client_addr, app_user, context, statement)
            SELECT sid, v_tx, v_tx_at, v_stmt_at, TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                x.k, pg_catalog.hashtextextended(x.k::text, 0), x.o, x.n, v_db_user, v_role,
                v_application, v_client_addr, v_actor, v_context, v_statement
            FROM (SELECT CASE WHEN v_key1 IS NOT NULL
                             THEN pg_catalog.jsonb_build_object(v_key1, j OPERATOR(pg_catalog.->) v_key1)
                             ELSE j OPERATOR(pg_catalog.-) v_nonkey END AS k, NULL::jsonb AS o,
                        j OPERATOR(pg_catalog.-) v_excluded AS n
                  FROM (SELECT pg_catalog.to_jsonb(r) AS j FROM new_rows r OFFSET 0) i) x;
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT;
                PERFORM {schema}.note_failure(TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                                               err_state, err_message);
            END;
        ELSE
            INSERT INTO {schema}.event (stmt_id, tx, tx_at, stmt_at, table_oid, schema_name,
                table_name, op, row_key, key_hash, old_row, new_row, db_user, role_name,
                application, client_addr, app_user, context, statement)
            SELECT sid, v_tx, v_tx_at, v_stmt_at, TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                x.k, pg_catalog.hashtextextended(x.k::text, 0), x.o, x.n, v_db_user, v_role,
                v_application, v_client_addr, v_actor, v_context, v_statement
            FROM (SELECT CASE WHEN v_key1 IS NOT NULL
                             THEN pg_catalog.jsonb_build_object(v_key1, j OPERATOR(pg_catalog.->) v_key1)
                             ELSE j OPERATOR(pg_catalog.-) v_nonkey END AS k, NULL::jsonb AS o,
                        j OPERATOR(pg_catalog.-) v_excluded AS n
                  FROM (SELECT pg_catalog.to_jsonb(r) AS j FROM new_rows r OFFSET 0) i) x;
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        IF v_mode = 'fail-open' THEN
            BEGIN
            INSERT INTO {schema}.event (stmt_id, tx, tx_at, stmt_at, table_oid, schema_name,
                table_name, op, row_key, key_hash, old_row, new_row, db_user, role_name,
                application, client_addr, app_user, context, statement)
            SELECT sid, v_tx, v_tx_at, v_stmt_at, TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                x.k, pg_catalog.hashtextextended(x.k::text, 0), x.o, x.n, v_db_user, v_role,
                v_application, v_client_addr, v_actor, v_context, v_statement
            FROM (SELECT CASE WHEN v_key1 IS NOT NULL
                             THEN pg_catalog.jsonb_build_object(v_key1, j OPERATOR(pg_catalog.->) v_key1)
                             ELSE j OPERATOR(pg_catalog.-) v_nonkey END AS k,
                        j OPERATOR(pg_catalog.-) v_excluded AS o, NULL::jsonb AS n
                  FROM (SELECT pg_catalog.to_jsonb(r) AS j FROM old_rows r OFFSET 0) i) x;
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT;
                PERFORM {schema}.note_failure(TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                                               err_state, err_message);
            END;
        ELSE
            INSERT INTO {schema}.event (stmt_id, tx, tx_at, stmt_at, table_oid, schema_name,
                table_name, op, row_key, key_hash, old_row, new_row, db_user, role_name,
                application, client_addr, app_user, context, statement)
            SELECT sid, v_tx, v_tx_at, v_stmt_at, TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                x.k, pg_catalog.hashtextextended(x.k::text, 0), x.o, x.n, v_db_user, v_role,
                v_application, v_client_addr, v_actor, v_context, v_statement
            FROM (SELECT CASE WHEN v_key1 IS NOT NULL
                             THEN pg_catalog.jsonb_build_object(v_key1, j OPERATOR(pg_catalog.->) v_key1)
                             ELSE j OPERATOR(pg_catalog.-) v_nonkey END AS k,
                        j OPERATOR(pg_catalog.-) v_excluded AS o, NULL::jsonb AS n
                  FROM (SELECT pg_catalog.to_jsonb(r) AS j FROM old_rows r OFFSET 0) i) x;
        END IF;
    ELSE
        -- Old and new rows pair by position (see the notes at the top); rows where nothing,
        -- or only excluded columns, changed are skipped.
        IF v_mode = 'fail-open' THEN
            BEGIN
            INSERT INTO {schema}.event (stmt_id, tx, tx_at, stmt_at, table_oid, schema_name,
                table_name, op, row_key, key_hash, old_row, new_row, db_user, role_name,
                application, client_addr, app_user, context, statement)
            SELECT sid, v_tx, v_tx_at, v_stmt_at, TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                x.k, pg_catalog.hashtextextended(x.k::text, 0), x.o, x.n, v_db_user, v_role,
                v_application, v_client_addr, v_actor, v_context, v_statement
            FROM (SELECT CASE WHEN v_key1 IS NOT NULL
                             THEN pg_catalog.jsonb_build_object(v_key1, nw.j OPERATOR(pg_catalog.->) v_key1)
                             ELSE nw.j OPERATOR(pg_catalog.-) v_nonkey END AS k,
                         od.img AS o, nw.img AS n
                  FROM (SELECT pg_catalog.to_jsonb(r) OPERATOR(pg_catalog.-) v_excluded AS img,
                               pg_catalog.row_number() OVER () AS pos
                        FROM old_rows r) od
                  JOIN (SELECT j, j OPERATOR(pg_catalog.-) v_excluded AS img,
                               pg_catalog.row_number() OVER () AS pos
                        FROM (SELECT pg_catalog.to_jsonb(r) AS j FROM new_rows r OFFSET 0) q) nw
                    ON od.pos OPERATOR(pg_catalog.=) nw.pos
                  WHERE od.img IS DISTINCT FROM nw.img
                  OFFSET 0) x;
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT;
                PERFORM {schema}.note_failure(TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                                               err_state, err_message);
            END;
        ELSE
            INSERT INTO {schema}.event (stmt_id, tx, tx_at, stmt_at, table_oid, schema_name,
                table_name, op, row_key, key_hash, old_row, new_row, db_user, role_name,
                application, client_addr, app_user, context, statement)
            SELECT sid, v_tx, v_tx_at, v_stmt_at, TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                x.k, pg_catalog.hashtextextended(x.k::text, 0), x.o, x.n, v_db_user, v_role,
                v_application, v_client_addr, v_actor, v_context, v_statement
            FROM (SELECT CASE WHEN v_key1 IS NOT NULL
                             THEN pg_catalog.jsonb_build_object(v_key1, nw.j OPERATOR(pg_catalog.->) v_key1)
                             ELSE nw.j OPERATOR(pg_catalog.-) v_nonkey END AS k,
                         od.img AS o, nw.img AS n
                  FROM (SELECT pg_catalog.to_jsonb(r) OPERATOR(pg_catalog.-) v_excluded AS img,
                               pg_catalog.row_number() OVER () AS pos
                        FROM old_rows r) od
                  JOIN (SELECT j, j OPERATOR(pg_catalog.-) v_excluded AS img,
                               pg_catalog.row_number() OVER () AS pos
                        FROM (SELECT pg_catalog.to_jsonb(r) AS j FROM new_rows r OFFSET 0) q) nw
                    ON od.pos OPERATOR(pg_catalog.=) nw.pos
                  WHERE od.img IS DISTINCT FROM nw.img
                  OFFSET 0) x;
        END IF;
    END IF;
    RETURN NULL;
END
$body$;

-- `jsonb_build_object('c1', <row>.c1, …)` for the key columns, as an SQL expression over a row
-- alias (used for whole-table captures, where the query is built once per call anyway).
CREATE OR REPLACE FUNCTION {schema}.key_expression(key_cols text[], alias text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN key_cols IS NULL OR pg_catalog.cardinality(key_cols) = 0
                THEN 'NULL::jsonb'
                ELSE 'pg_catalog.jsonb_build_object(' || pg_catalog.string_agg(
                         pg_catalog.format('%L::text, %s.%I', c, alias, c), ', ') || ')' END
    FROM pg_catalog.unnest(key_cols) AS c
$$;

-- Rows of a whole table as events (TRUNCATE's removed rows, or SNAPSHOT when tracking starts),
-- written like a capture statement's: small or bulk, in key-hash order.
CREATE OR REPLACE FUNCTION {schema}.write_table_rows(relid oid, op text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    excl text[];
    nsp text;
    rel text;
    stmt text;
    written bigint;
BEGIN
    SELECT n.nspname, c.relname INTO nsp, rel
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = relid;
    SELECT t.exclude_columns INTO excl FROM {schema}.tracked t WHERE t.table_oid = relid;
    IF (SELECT m.value FROM {schema}.meta m WHERE m.key = 'record_statement') = 'on' THEN
        stmt := pg_catalog.current_query();
    END IF;
    EXECUTE pg_catalog.format(
        'INSERT INTO {schema}.event (stmt_id, tx, tx_at, stmt_at, table_oid, schema_name,'
        ' table_name, op, row_key, key_hash, old_row, new_row, db_user, role_name, application,'
        ' client_addr, app_user, context, statement, kind)'
        ' SELECT $16, $1, $2, $3, $4, $5, $6, $7, x.k, x.h,'
        ' CASE WHEN $7 = %L THEN x.img END, CASE WHEN $7 = %L THEN x.img END,'
        ' $8, $9, $10, $11, $12, $13, $14,'
        ' CASE WHEN x.total <= 1000 THEN ''s'' WHEN x.rn = 1 THEN ''h'' ELSE ''b'' END'
        ' FROM (SELECT y.*, pg_catalog.row_number() OVER (ORDER BY y.h) AS rn,'
        ' pg_catalog.count(*) OVER () AS total'
        ' FROM (SELECT z.k, pg_catalog.hashtextextended(z.k::text, 0) AS h, z.img'
        ' FROM (SELECT %s AS k, pg_catalog.to_jsonb(r) OPERATOR(pg_catalog.-) $15 AS img'
        ' FROM ONLY %I.%I r OFFSET 0) z) y) x'
        ' ORDER BY x.h',
        'TRUNCATE', 'SNAPSHOT', {schema}.key_expression({schema}.key_columns(relid), 'r'),
        nsp, rel)
    USING pg_catalog.pg_current_xact_id()::text::bigint, pg_catalog.transaction_timestamp(),
        pg_catalog.statement_timestamp(), relid, nsp, rel, op, pg_catalog.session_user()::text,
        {schema}.acting_role(), pg_catalog.current_setting('application_name'),
        pg_catalog.inet_client_addr(), NULLIF(pg_catalog.current_setting('pgwarden.actor', true), ''),
        NULLIF(pg_catalog.current_setting('pgwarden.context', true), ''), stmt,
        COALESCE(excl, '{{}}'::text[]), pg_catalog.nextval('{schema}.statement_seq');
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END
$body$;

-- The events of deferred statements, written from their spools (oldest statement first) as
-- a bulk statement's are, then the spools dropped. Every reader runs it first; concurrent
-- callers queue on an advisory lock. Returns how many statements it wrote.
CREATE OR REPLACE FUNCTION {schema}.materialize() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    d record;
    done bigint := 0;
    v_key1 text;
    v_nonkey text[];
    v_image text := 'pg_catalog.to_jsonb(%1$s) OPERATOR(pg_catalog.-)'
                    ' ''{{pgwarden$side,pgwarden$ord}}''::text[]';
    v_key text := 'CASE WHEN $16 IS NOT NULL'
                  ' THEN pg_catalog.jsonb_build_object($16, %1$s OPERATOR(pg_catalog.->) $16)'
                  ' ELSE %1$s OPERATOR(pg_catalog.-) $17 END';
    v_source text;
    v_work_mem text := pg_catalog.current_setting('work_mem');
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {schema}.deferred) THEN
        RETURN 0;
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext({schema_name} || '.materialize'));
    PERFORM pg_catalog.set_config('work_mem', '64MB', true);
    PERFORM pg_catalog.set_config('pgwarden.spooling', 'on', true);
    FOR d IN SELECT * FROM {schema}.deferred ORDER BY stmt_id LOOP
        -- Gone: written by a caller that committed while this (repeatable read) one waited.
        CONTINUE WHEN pg_catalog.to_regclass(pg_catalog.format('{schema}.%I', d.spool)) IS NULL;
        IF pg_catalog.cardinality(d.key_columns) = 1 THEN
            v_key1 := d.key_columns[1];
            v_nonkey := NULL;
        ELSE
            v_key1 := NULL;
            v_nonkey := ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
                              WHERE a.attrelid = pg_catalog.format('{schema}.%I', d.spool)::regclass
                                AND a.attnum > 0 AND NOT a.attisdropped
                                AND a.attname::text NOT IN ('pgwarden$side', 'pgwarden$ord')
                                AND a.attname::text <> ALL (d.key_columns));
        END IF;
        IF d.op = 'INSERT' THEN
            v_source := pg_catalog.format('SELECT %s AS k, NULL::jsonb AS o, j AS n'
                ' FROM (SELECT %s AS j FROM {schema}.%I s OFFSET 0) i',
                pg_catalog.format(v_key, 'j'), pg_catalog.format(v_image, 's'), d.spool);
        ELSIF d.op = 'DELETE' THEN
            v_source := pg_catalog.format('SELECT %s AS k, j AS o, NULL::jsonb AS n'
                ' FROM (SELECT %s AS j FROM {schema}.%I s OFFSET 0) i',
                pg_catalog.format(v_key, 'j'), pg_catalog.format(v_image, 's'), d.spool);
        ELSE
            -- Pair the native rows first, then build each image once (OFFSET 0): building
            -- them before the join made the planner build them twice, 2.6 times slower.
            v_source := pg_catalog.format('SELECT %s AS k, x.o, x.n'
                ' FROM (SELECT %s AS o, %s AS n FROM {schema}.%I so JOIN {schema}.%I sn'
                '       ON so."pgwarden$ord" OPERATOR(pg_catalog.=) sn."pgwarden$ord"'
                '       WHERE so."pgwarden$side" = %L AND sn."pgwarden$side" = %L OFFSET 0) x'
                ' WHERE x.o IS DISTINCT FROM x.n',
                pg_catalog.format(v_key, 'x.n'), pg_catalog.format(v_image, 'so'),
                pg_catalog.format(v_image, 'sn'), d.spool, d.spool, 'o', 'n');
        END IF;
        EXECUTE {schema}.bulk_insert(v_source)
            USING d.stmt_id, d.tx, d.tx_at, d.stmt_at, d.table_oid, d.schema_name, d.table_name,
                d.op, d.db_user, d.role_name, d.application, d.client_addr, d.app_user,
                d.context, d.statement, v_key1, v_nonkey;
        EXECUTE pg_catalog.format('DROP TABLE {schema}.%I', d.spool);
        DELETE FROM {schema}.deferred WHERE stmt_id = d.stmt_id;
        done := done + 1;
    END LOOP;
    PERFORM pg_catalog.set_config('pgwarden.spooling', '', true);
    PERFORM pg_catalog.set_config('work_mem', v_work_mem, true);
    RETURN done;
END
$body$;

-- history.defer_rows in pgwarden.yaml: this database's default for pgwarden.defer_rows (0 or
-- less: none). Runs with the caller's rights: ALTER DATABASE needs its owner or a superuser.
CREATE OR REPLACE FUNCTION {schema}.set_defer_rows(n bigint) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    IF n > 0 THEN
        EXECUTE pg_catalog.format('ALTER DATABASE %I SET pgwarden.defer_rows = %L',
                                  pg_catalog.current_database(), n::text);
    ELSE
        EXECUTE pg_catalog.format('ALTER DATABASE %I RESET pgwarden.defer_rows',
                                  pg_catalog.current_database());
    END IF;
END
$body$;

-- BEFORE TRUNCATE: record the rows about to disappear (or a marker only).
CREATE OR REPLACE FUNCTION {schema}.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    cfg record;
    err_state text;
    err_message text;
BEGIN
    SELECT t.mode, t.truncate_mode INTO cfg FROM {schema}.tracked t WHERE t.table_oid = TG_RELID;
    BEGIN
        IF cfg.truncate_mode = 'marker' THEN
            INSERT INTO {schema}.event (stmt_id, tx, tx_at, stmt_at, table_oid, schema_name,
                table_name, op, db_user, role_name, application, client_addr, app_user, context)
            VALUES (pg_catalog.nextval('{schema}.statement_seq'),
                pg_catalog.pg_current_xact_id()::text::bigint, pg_catalog.transaction_timestamp(),
                pg_catalog.statement_timestamp(), TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME,
                'TRUNCATE', pg_catalog.session_user()::text, {schema}.acting_role(),
                pg_catalog.current_setting('application_name'), pg_catalog.inet_client_addr(),
                NULLIF(pg_catalog.current_setting('pgwarden.actor', true), ''),
                NULLIF(pg_catalog.current_setting('pgwarden.context', true), ''));
        ELSE
            PERFORM {schema}.write_table_rows(TG_RELID, 'TRUNCATE');
        END IF;
    EXCEPTION WHEN OTHERS THEN
        IF COALESCE(cfg.mode, 'fail-closed') <> 'fail-open' THEN
            RAISE;
        END IF;
        GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT;
        RAISE WARNING 'pgwarden: history of TRUNCATE on %.% was not recorded: %',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, err_message;
        INSERT INTO {schema}.capture_failure
            (tx, table_oid, schema_name, table_name, op, sqlstate, message)
        VALUES (pg_catalog.pg_current_xact_id(), TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME,
                'TRUNCATE', err_state, err_message);
    END;
    RETURN NULL;
END
$body$;

-- History is append-only: even its owner cannot UPDATE, DELETE or TRUNCATE it. Retention drops
-- whole partitions instead.
CREATE OR REPLACE FUNCTION {schema}.forbid_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    RAISE EXCEPTION 'pgwarden history is append-only: % on %.% is not allowed',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'old events are removed only by `pgwarden retention`';
END
$body$;

CREATE OR REPLACE TRIGGER event_append_only BEFORE UPDATE OR DELETE ON {schema}.event
    FOR EACH ROW EXECUTE FUNCTION {schema}.forbid_change();
CREATE OR REPLACE TRIGGER event_no_truncate BEFORE TRUNCATE ON {schema}.event
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_change();
CREATE OR REPLACE TRIGGER event_no_truncate BEFORE TRUNCATE ON {schema}.event_default
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_change();
CREATE OR REPLACE TRIGGER ddl_log_append_only BEFORE UPDATE OR DELETE ON {schema}.ddl_log
    FOR EACH ROW EXECUTE FUNCTION {schema}.forbid_change();
CREATE OR REPLACE TRIGGER ddl_log_no_truncate BEFORE TRUNCATE ON {schema}.ddl_log
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_change();

-- Monthly partitions from one month back to `months_ahead` months ahead.
CREATE OR REPLACE FUNCTION {schema}.ensure_partitions(months_ahead int DEFAULT 3)
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    month date;
    part text;
BEGIN
    FOR month IN
        SELECT pg_catalog.generate_series(
            pg_catalog.date_trunc('month', pg_catalog.now() - interval '1 month'),
            pg_catalog.date_trunc('month', pg_catalog.now()) + pg_catalog.make_interval(months => months_ahead),
            interval '1 month')::date
    LOOP
        part := 'event_p' || pg_catalog.to_char(month, 'YYYYMM');
        CONTINUE WHEN pg_catalog.to_regclass('{schema}.' || pg_catalog.quote_ident(part)) IS NOT NULL;
        BEGIN
            EXECUTE pg_catalog.format(
                'CREATE TABLE {schema}.%I PARTITION OF {schema}.event FOR VALUES FROM (%L) TO (%L)',
                part, month::timestamptz, (month + interval '1 month')::timestamptz);
        EXCEPTION WHEN check_violation THEN
            -- The default partition already holds rows of that month: leave them there.
            RAISE WARNING 'pgwarden: partition % not created: the default partition has rows '
                          'in its range', part;
            CONTINUE;
        END;
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER event_no_truncate BEFORE TRUNCATE ON {schema}.%I '
            'FOR EACH STATEMENT EXECUTE FUNCTION {schema}.forbid_change()', part);
        EXECUTE pg_catalog.format('ALTER TABLE {schema}.%I OWNER TO {owner}', part);
        RETURN NEXT part;
    END LOOP;
END
$body$;

-- The arguments the capture triggers of a tracked table should carry.
CREATE OR REPLACE FUNCTION {schema}.capture_args(relid oid) RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY[t.mode, t.exclude_columns::text, {schema}.key_columns(relid)::text,
                 COALESCE((SELECT m.value FROM {schema}.meta m WHERE m.key = 'record_statement'),
                          'off')]
    FROM {schema}.tracked t WHERE t.table_oid = relid
$$;

-- 'ok', 'missing' (a capture trigger is gone), 'disabled' (not ENABLE ALWAYS) or 'stale' (its
-- arguments no longer match the table's settings or key, e.g. after a primary key change).
CREATE OR REPLACE FUNCTION {schema}.trigger_state(relid oid) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH want AS (SELECT {schema}.capture_args(relid) AS args),
    have AS (
        SELECT g.tgname, g.tgenabled,
               (pg_catalog.regexp_split_to_array(pg_catalog.encode(g.tgargs, 'escape'), '\\000'))[1:4]
                   AS args
        FROM pg_catalog.pg_trigger g
        WHERE g.tgrelid = relid AND g.tgname IN ('pgwarden_capture_insert',
              'pgwarden_capture_update', 'pgwarden_capture_delete', 'pgwarden_capture_truncate')
    )
    SELECT CASE
        WHEN (SELECT pg_catalog.count(*) FROM have) < 4 THEN 'missing'
        WHEN EXISTS (SELECT 1 FROM have WHERE have.tgenabled <> 'A') THEN 'disabled'
        WHEN EXISTS (SELECT 1 FROM have, want
                     WHERE have.tgname <> 'pgwarden_capture_truncate'
                       AND have.args IS DISTINCT FROM want.args) THEN 'stale'
        ELSE 'ok' END
$$;

-- Start tracking a table: triggers (ENABLE ALWAYS, so session_replication_role = replica does
-- not skip them), its settings, and a SNAPSHOT of its rows when it was not tracked before.
CREATE OR REPLACE FUNCTION {schema}.track(
    relid regclass,
    track_mode text DEFAULT 'fail-closed',
    excluded text[] DEFAULT '{{}}',
    truncate_how text DEFAULT 'rows',
    requested_by text DEFAULT 'config'
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
    args text[];
    snapshot bigint := 0;
    bad text;
BEGIN
    SELECT n.nspname, c.relname, c.relkind INTO nsp, rel, kind
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = relid;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'pgwarden: %.% is not a table', nsp, rel USING ERRCODE = 'wrong_object_type';
    END IF;
    key_cols := {schema}.key_columns(relid);
    IF key_cols IS NULL THEN
        RAISE EXCEPTION 'pgwarden: %.% has no primary key, so its rows have no identity to '
                        'record history by', nsp, rel
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'add a primary key (or REPLICA IDENTITY USING INDEX on a unique, '
                         'not-null index), then track it';
    END IF;
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

    was_tracked := EXISTS (SELECT 1 FROM {schema}.tracked t WHERE t.table_oid = relid);
    PERFORM pg_catalog.set_config('pgwarden.in_track', 'on', true);
    INSERT INTO {schema}.tracked AS t
        (table_oid, schema_name, table_name, mode, exclude_columns, truncate_mode, source)
    VALUES (relid, nsp, rel, track_mode, excluded, truncate_how, requested_by)
    ON CONFLICT (table_oid) DO UPDATE
        SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
            mode = EXCLUDED.mode, exclude_columns = EXCLUDED.exclude_columns,
            truncate_mode = EXCLUDED.truncate_mode,
            source = CASE WHEN t.source = 'manual' AND EXCLUDED.source <> 'manual'
                          THEN t.source ELSE EXCLUDED.source END;

    args := {schema}.capture_args(relid);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER pgwarden_capture_insert AFTER INSERT ON %I.%I '
        'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT '
        'EXECUTE FUNCTION {schema}.capture(%L, %L, %L, %L)',
        nsp, rel, args[1], args[2], args[3], args[4]);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER pgwarden_capture_update AFTER UPDATE ON %I.%I '
        'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT '
        'EXECUTE FUNCTION {schema}.capture(%L, %L, %L, %L)',
        nsp, rel, args[1], args[2], args[3], args[4]);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER pgwarden_capture_delete AFTER DELETE ON %I.%I '
        'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT '
        'EXECUTE FUNCTION {schema}.capture(%L, %L, %L, %L)',
        nsp, rel, args[1], args[2], args[3], args[4]);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER pgwarden_capture_truncate BEFORE TRUNCATE ON %I.%I '
        'FOR EACH STATEMENT EXECUTE FUNCTION {schema}.capture_truncate()', nsp, rel);
    EXECUTE pg_catalog.format(
        'ALTER TABLE %I.%I ENABLE ALWAYS TRIGGER pgwarden_capture_insert, '
        'ENABLE ALWAYS TRIGGER pgwarden_capture_update, '
        'ENABLE ALWAYS TRIGGER pgwarden_capture_delete, '
        'ENABLE ALWAYS TRIGGER pgwarden_capture_truncate', nsp, rel);

    -- The history owner reads the table for SNAPSHOT and TRUNCATE events.
    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA %I TO {owner}', nsp);
    EXECUTE pg_catalog.format('GRANT SELECT ON %I.%I TO {owner}', nsp, rel);

    IF NOT was_tracked THEN
        -- CREATE TRIGGER holds a lock that blocks writers until commit, so this snapshot and
        -- the triggers see the same rows: nothing slips between them.
        snapshot := {schema}.write_table_rows(relid, 'SNAPSHOT');
    END IF;
    PERFORM pg_catalog.set_config('pgwarden.in_track', '', true);
    RETURN snapshot;
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
BEGIN
    SELECT n.nspname, c.relname INTO nsp, rel
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = relid;
    PERFORM pg_catalog.set_config('pgwarden.in_track', 'on', true);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgwarden_capture_insert ON %I.%I', nsp, rel);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgwarden_capture_update ON %I.%I', nsp, rel);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgwarden_capture_delete ON %I.%I', nsp, rel);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgwarden_capture_truncate ON %I.%I', nsp, rel);
    DELETE FROM {schema}.tracked t WHERE t.table_oid = relid;
    PERFORM pg_catalog.set_config('pgwarden.in_track', '', true);
END
$body$;

-- The rows of a table as of a time (transaction time), rebuilt from history alone: per key, the
-- last word wins. An UPDATE that moved a row to a new key also removes the old key; inside one
-- statement, a key being taken beats it being vacated (a multi-row key shift vacates and retakes
-- keys in any order). Rows whose last word is DELETE or TRUNCATE are gone. Sorted on the key's
-- bigint hash first: comparing JSONB keys made the sort of a 1M-row table 7 s instead of 0.6 s.
CREATE OR REPLACE FUNCTION {schema}.rows_as_of(relid oid, at timestamptz)
RETURNS SETOF jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
-- Each bulk statement's rows are read once: caching them (Memoize) only copies them.
SET enable_memoize = off
AS $$
    SELECT last.img FROM (
        SELECT DISTINCT ON (ev.h, ev.k) ev.k, ev.img
        FROM (
            SELECT e.stmt_id, e.id, e.key_hash AS h, e.row_key AS k, 1 AS prio,
                   CASE WHEN e.op IN ('DELETE', 'TRUNCATE') THEN NULL ELSE e.new_row END AS img
            FROM {schema}.table_event e
            WHERE e.table_oid = relid AND e.tx_at <= at AND e.row_key IS NOT NULL
          UNION ALL
            SELECT u.stmt_id, u.id, pg_catalog.hashtextextended(u.old_key::text, 0), u.old_key, 0,
                   NULL
            FROM (SELECT e.stmt_id, e.id, e.row_key,
                         (SELECT pg_catalog.jsonb_object_agg(c, e.old_row OPERATOR(pg_catalog.->) c)
                          FROM pg_catalog.jsonb_object_keys(e.row_key) AS c) AS old_key
                  FROM {schema}.table_event e
                  WHERE e.table_oid = relid AND e.tx_at <= at AND e.op = 'UPDATE') u
            WHERE u.old_key OPERATOR(pg_catalog.<>) u.row_key
        ) ev
        ORDER BY ev.h, ev.k, ev.stmt_id DESC, ev.prio DESC, ev.id DESC
    ) last
    WHERE last.img IS NOT NULL
$$;

-- Rewinding: a table as of `at` is also its live rows with every change after `at` undone.
-- When few rows changed since, that is a copy of the table plus a little, instead of replaying
-- all of its history. It is only right when history after `at` is complete: this says why not
-- (NULL when it is).
CREATE OR REPLACE FUNCTION {schema}.rewind_blocker(relid oid, at timestamptz) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    -- rewind_blocker.at: a bare `at` would mean the column of that name in the log tables.
    SELECT CASE
        WHEN t.table_oid IS NULL THEN 'the table is not tracked now'
        WHEN t.since > rewind_blocker.at THEN 'tracking (re)started after that time'
        WHEN pg_catalog.cardinality(t.exclude_columns) > 0
            THEN 'some columns are excluded from history'
        WHEN {schema}.trigger_state(relid) <> 'ok'
            THEN 'its capture triggers are ' || {schema}.trigger_state(relid)
        WHEN EXISTS (SELECT 1 FROM {schema}.capture_failure f
                     WHERE f.table_oid = relid AND f.at > rewind_blocker.at)
            THEN 'a fail-open change went unrecorded since'
        WHEN EXISTS (SELECT 1 FROM {schema}.table_event e
                     WHERE e.table_oid = relid AND e.tx_at > rewind_blocker.at
                       AND e.row_key IS NULL)
            THEN 'a TRUNCATE recorded as a marker only since'
        -- Schema changes (columns, keys, triggers) since: the live rows no longer have the
        -- shape the events describe. The DDL log names the table, its columns, its triggers.
        WHEN EXISTS (SELECT 1 FROM {schema}.ddl_log d
                     WHERE d.at > rewind_blocker.at
                       AND (d.object_identity = ident
                            OR pg_catalog.left(d.object_identity,
                                   pg_catalog.length(ident) + 1)
                               = ident || '.'
                            OR pg_catalog.right(d.object_identity,
                                   pg_catalog.length(ident) + 4)
                               = ' on ' || ident))
            THEN 'the table''s definition changed since'
        END
    FROM (SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) AS ident
          FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = relid) i
    LEFT JOIN {schema}.tracked t ON t.table_oid = relid
$$;

-- For every key changed after `at`: its row as of `at`, NULL when the key was free then. The
-- first change after `at` decides: a change of an existing row (UPDATE, DELETE, TRUNCATE) holds
-- its earlier image; a key being taken (INSERT, or an UPDATE moving a row onto it) means it was
-- free, unless the same statement vacated it first (a key shift), hence prio.
CREATE OR REPLACE FUNCTION {schema}.rows_before(relid oid, at timestamptz)
RETURNS TABLE (k jsonb, img jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
-- Each bulk statement's rows are read once: caching them (Memoize) only copies them.
SET enable_memoize = off
AS $$
    SELECT DISTINCT ON (ev.h, ev.k) ev.k, ev.img
    FROM (SELECT pg_catalog.hashtextextended(x.k::text, 0) AS h, x.* FROM (
        SELECT CASE WHEN e.op = 'UPDATE'
                    THEN (SELECT pg_catalog.jsonb_object_agg(c, e.old_row OPERATOR(pg_catalog.->) c)
                          FROM pg_catalog.jsonb_object_keys(e.row_key) AS c)
                    ELSE e.row_key END AS k,
               e.old_row AS img, e.stmt_id, 0 AS prio, e.id
        FROM {schema}.table_event e
        WHERE e.table_oid = relid AND e.tx_at > at
          AND e.old_row IS NOT NULL AND e.row_key IS NOT NULL
      UNION ALL
        SELECT e.row_key, NULL, e.stmt_id, 1, e.id
        FROM {schema}.table_event e
        WHERE e.table_oid = relid AND e.tx_at > at
          AND e.new_row IS NOT NULL AND e.row_key IS NOT NULL
        OFFSET 0  -- k once per row, not once more for h
    ) x) ev
    ORDER BY ev.h, ev.k, ev.stmt_id, ev.prio, ev.id
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {schema} FROM PUBLIC;
ALTER FUNCTION {schema}.capture() OWNER TO {owner};
ALTER FUNCTION {schema}.bulk_insert(text) OWNER TO {owner};
ALTER FUNCTION {schema}.materialize() OWNER TO {owner};
-- Anyone who may read history may bring it up to date (it writes only what was captured).
GRANT EXECUTE ON FUNCTION {schema}.materialize() TO PUBLIC;
ALTER FUNCTION {schema}.capture_truncate() OWNER TO {owner};
ALTER FUNCTION {schema}.write_table_rows(oid, text) OWNER TO {owner};
ALTER FUNCTION {schema}.acting_role() OWNER TO {owner};
ALTER FUNCTION {schema}.key_columns(oid) OWNER TO {owner};
ALTER FUNCTION {schema}.key_expression(text[], text) OWNER TO {owner};
ALTER FUNCTION {schema}.capture_args(oid) OWNER TO {owner};
ALTER FUNCTION {schema}.trigger_state(oid) OWNER TO {owner};
ALTER FUNCTION {schema}.note_failure(oid, text, text, text, text, text) OWNER TO {owner};
ALTER FUNCTION {schema}.forbid_change() OWNER TO {owner};
ALTER FUNCTION {schema}.rows_as_of(oid, timestamptz) OWNER TO {owner};
ALTER FUNCTION {schema}.rewind_blocker(oid, timestamptz) OWNER TO {owner};
ALTER FUNCTION {schema}.rows_before(oid, timestamptz) OWNER TO {owner};
