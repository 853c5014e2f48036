-- pgwarden history: capture. Functions only; placeholders as in base.sql.
--
-- What a change looks like once recorded (the one definition both capture engines write):
--   {schema}.tx            who and when: one row per transaction and context (acting role,
--                          application name, pgwarden.actor, pgwarden.context); its id is the
--                          id of the statement that first needed it.
--   {schema}.rows_<id>     one per tracked table: per changed row, the context id (ctx), the
--                          statement id (stmt, from statement_seq: orders statements across
--                          sessions), the operation (op) and native copies of the old and the
--                          new row, one column per captured column and side (see
--                          logged_column). No JSON at write time: it is built when read.
--   {schema}.statement     the statement text, only with history.record_statement.
-- op: I insert, U update, D delete, T a row removed by TRUNCATE, X a TRUNCATE recorded as a
-- marker only (no rows), S a row as it was when tracking (re)started.
--
-- Two engines write it. The compiled trigger (native/pgwarden_capture.c) when the server can
-- load it; else the PL/pgSQL function generated here for each table (capture_<id>), which also
-- handles TRUNCATE for both. Both are statement-level AFTER triggers with transition tables: a
-- bulk statement is one set-based write, and every row of a statement shares its id.

-- The context id for statement `stmt` (PL/pgSQL engine): the one already written in this
-- transaction for the same acting role, application, actor and context, or a new tx row whose
-- id is `stmt`. Remembered in the transaction-local setting pgwarden.ctx, which a rolled-back
-- subtransaction takes back with the row it wrote. The transaction id in it makes a value
-- carried over from another transaction useless.
CREATE OR REPLACE FUNCTION {schema}.context_id(stmt bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    v_role text := {schema}.acting_role();
    v_app text := NULLIF(pg_catalog.current_setting('application_name'), '');
    v_actor text := NULLIF(pg_catalog.current_setting('pgwarden.actor', true), '');
    v_context text := NULLIF(pg_catalog.current_setting('pgwarden.context', true), '');
    v_tx bigint := pg_catalog.pg_current_xact_id()::text::bigint;
    -- Lengths first, so that no two different contexts read alike.
    v_sig text := pg_catalog.format('%s %s:%s %s:%s %s:%s %s:%s', v_tx,
        pg_catalog.length(v_role), v_role, pg_catalog.length(v_app), v_app,
        pg_catalog.length(v_actor), v_actor, pg_catalog.length(v_context), v_context);
    v_have text := pg_catalog.current_setting('pgwarden.ctx', true);
    v_space int;
BEGIN
    IF v_have IS NOT NULL AND v_have <> '' THEN
        v_space := pg_catalog.strpos(v_have, ' ');
        IF pg_catalog.substr(v_have, v_space + 1) = v_sig THEN
            RETURN pg_catalog.substr(v_have, 1, v_space - 1)::bigint;
        END IF;
    END IF;
    INSERT INTO {schema}.tx (id, tx, at, db_user, role_name, application, client_addr,
                             app_user, context)
    VALUES (stmt, v_tx, pg_catalog.transaction_timestamp(), pg_catalog.session_user()::text,
            v_role, v_app, pg_catalog.inet_client_addr(), v_actor, v_context);
    PERFORM pg_catalog.set_config('pgwarden.ctx', stmt::text || ' ' || v_sig, true);
    RETURN stmt;
END
$body$;

-- The columns one engine writes for a table now: per captured column, its name in the table
-- and its slots in the history table (the current generation of each, see logged_column).
CREATE OR REPLACE FUNCTION {schema}.live_slots(log int)
RETURNS TABLE (attnum int2, attname text, typid oid, old_col text, new_col text,
               old_pos int2, new_pos int2)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.attnum, a.attname::text, a.atttypid, c.old_col, c.new_col, ho.attnum, hn.attnum
    FROM {schema}.logged_column c
    JOIN {schema}.logged_table t ON t.id = c.log_id
    JOIN pg_catalog.pg_attribute a ON a.attrelid = t.table_oid AND a.attnum = c.attnum
                                   AND NOT a.attisdropped
    JOIN pg_catalog.pg_attribute ho ON ho.attrelid = pg_catalog.format('{schema}.%I', t.shadow)::regclass
                                    AND ho.attname = c.old_col
    JOIN pg_catalog.pg_attribute hn ON hn.attrelid = ho.attrelid AND hn.attname = c.new_col
    WHERE c.log_id = log AND c.until IS NULL
    ORDER BY c.attnum
$$;

-- Rows of a whole table into its history in one statement: S (as it is when tracking starts,
-- as new images) or T (removed by TRUNCATE, as old images); X writes the TRUNCATE marker row
-- alone. Each also marks where replaying this table's history starts again (`reset`).
CREATE OR REPLACE FUNCTION {schema}.write_rows(log int, op "char", ctx bigint, stmt bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    t record;
    cols text;
    vals text;
    written bigint := 1;
BEGIN
    SELECT * INTO t FROM {schema}.logged_table l WHERE l.id = log;
    INSERT INTO {schema}.reset (log_id, stmt, ctx, kind) VALUES (log, stmt, ctx, op);
    IF op = 'X' THEN
        EXECUTE pg_catalog.format('INSERT INTO {schema}.%I (ctx, stmt, op) VALUES ($1, $2, %L)',
                                  t.shadow, op) USING ctx, stmt;
        RETURN 0;
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(CASE WHEN op = 'S' THEN s.new_col
                                                             ELSE s.old_col END), ', '),
           pg_catalog.string_agg(pg_catalog.format('r.%I', s.attname), ', ')
    INTO cols, vals
    FROM {schema}.live_slots(log) s;
    EXECUTE pg_catalog.format(
        'INSERT INTO {schema}.%I (ctx, stmt, op%s) SELECT $1, $2, %L%s FROM ONLY %I.%I r',
        t.shadow, COALESCE(', ' || cols, ''), op, COALESCE(', ' || vals, ''),
        t.schema_name, t.table_name) USING ctx, stmt;
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END
$body$;

-- The body of the PL/pgSQL capture function of one table, from its current column map and
-- settings. Static SQL throughout, so PL/pgSQL plans each statement once per session.
CREATE OR REPLACE FUNCTION {schema}.capture_source(log int) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    t record;
    tr record;
    n_cols text;
    o_cols text;
    new_vals text;
    old_vals text;
    pair_old text;
    pair_new text;
    body text;
    record_statement boolean;
BEGIN
    SELECT * INTO t FROM {schema}.logged_table l WHERE l.id = log;
    SELECT * INTO tr FROM {schema}.tracked k WHERE k.table_oid = t.table_oid;
    record_statement := (SELECT m.value FROM {schema}.meta m WHERE m.key = 'record_statement')
                        IS NOT DISTINCT FROM 'on';
    SELECT pg_catalog.string_agg(', ' || pg_catalog.quote_ident(s.new_col), ''),
           pg_catalog.string_agg(', ' || pg_catalog.quote_ident(s.old_col), ''),
           pg_catalog.string_agg(pg_catalog.format(', r.%I', s.attname), ''),
           pg_catalog.string_agg(pg_catalog.format(', (a.o).%I', s.attname), ''),
           pg_catalog.string_agg(pg_catalog.format(', (b.n).%I', s.attname), '')
    INTO n_cols, o_cols, new_vals, pair_old, pair_new
    FROM {schema}.live_slots(log) s;
    n_cols := COALESCE(n_cols, ''); o_cols := COALESCE(o_cols, '');
    new_vals := COALESCE(new_vals, ''); pair_old := COALESCE(pair_old, '');
    pair_new := COALESCE(pair_new, '');
    body := pg_catalog.format($f$
DECLARE
    s bigint := pg_catalog.nextval('{schema}.statement_seq');
    c bigint;
    err_state text;
    err_message text;
BEGIN
    %1$s
    c := {schema}.context_id(s);
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {schema}.%2$I (ctx, stmt, op%3$s) SELECT c, s, 'I'%5$s FROM new_rows r;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {schema}.%2$I (ctx, stmt, op%4$s) SELECT c, s, 'D'%5$s FROM old_rows r;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Old and new images pair by position (see native/pgwarden_capture.c); rows whose
        -- captured columns are byte for byte the same are not recorded.
        INSERT INTO {schema}.%2$I (ctx, stmt, op%4$s%3$s)
        SELECT c, s, 'U'%6$s%7$s
        FROM (SELECT o, pg_catalog.row_number() OVER () AS i FROM old_rows o) a
        JOIN (SELECT n, pg_catalog.row_number() OVER () AS i FROM new_rows n) b
          ON a.i OPERATOR(pg_catalog.=) b.i
        WHERE NOT pg_catalog.record_image_eq(ROW(NULL::int%6$s), ROW(NULL::int%7$s));
    ELSE
        PERFORM {schema}.write_rows(%8$s, %9$L, c, s);
    END IF;
    %10$s
    %11$s
    RETURN NULL;
END$f$,
        CASE WHEN tr.mode = 'fail-open' THEN 'BEGIN' ELSE '' END,
        t.shadow, n_cols, o_cols, new_vals, pair_old, pair_new, log,
        CASE WHEN tr.truncate_mode = 'marker' THEN 'X' ELSE 'T' END,
        CASE WHEN record_statement THEN
            'INSERT INTO {schema}.statement (stmt, ctx, at, text) VALUES (s, c, '
            'pg_catalog.statement_timestamp(), pg_catalog.current_query());' ELSE '' END,
        CASE WHEN tr.mode = 'fail-open' THEN
            'EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT;
        PERFORM {schema}.note_failure(TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
                                       err_state, err_message);
    END;' ELSE '' END);
    RETURN body;
END
$body$;

-- The compiled trigger, when this server can load it (history/native.py creates it). Its
-- arguments: see native/pgwarden_capture.c.
CREATE OR REPLACE FUNCTION {schema}.native_args(log int) RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY[
        pg_catalog.format('{schema}.%I', t.shadow)::regclass::oid::text,
        '{schema}.tx'::regclass::oid::text,
        '{schema}.statement_seq'::regclass::oid::text,
        k.mode,
        CASE WHEN (SELECT m.value FROM {schema}.meta m WHERE m.key = 'record_statement') = 'on'
             THEN '{schema}.statement'::regclass::oid::text ELSE '0' END,
        (SELECT c.relnatts FROM pg_catalog.pg_class c WHERE c.oid = t.table_oid)::text || ';'
        || COALESCE((SELECT pg_catalog.string_agg(pg_catalog.format('%s:%s:%s:%s', s.attnum,
                         s.typid, s.old_pos, s.new_pos), ',' ORDER BY s.attnum)
                     FROM {schema}.live_slots(log) s), '')]
    FROM {schema}.logged_table t JOIN {schema}.tracked k ON k.table_oid = t.table_oid
    WHERE t.id = log
$$;
