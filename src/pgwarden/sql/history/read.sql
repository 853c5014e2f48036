-- pgwarden history: reading. Functions only; placeholders as in base.sql.
--
-- History tables hold native values; JSON is made here, when read. An image lists the columns
-- the table had when the event was written (from the statement id and logged_column), under
-- their current names, in the table's column order; `json`, not `jsonb`, so that order and
-- every number's digits are kept as PostgreSQL wrote them.

-- A json or jsonb column's value goes into an image as a JSON string holding its JSON text
-- (arrays of them: arrays of such strings), the way Debezium carries them: embedded, a JSON
-- `null` and an SQL NULL would both be `null`, and a json value's own spelling would be lost.
-- Columns kept from 0.1's JSON history (attnum < 0) were embedded already and stay so.
CREATE OR REPLACE FUNCTION {schema}.json_as_text(attnum int2, type text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN attnum < 0 THEN ''
                WHEN type IN ('json', 'jsonb') THEN '::text'
                WHEN type IN ('json[]', 'jsonb[]') THEN '::text[]'
                ELSE '' END
$$;

-- The SQL expression (text) for one side ('o' old, 'n' new) of the events in history table
-- alias `alias`, as json; `only` limits it to some columns (the key). Columns come and go at
-- statement ids (since, until), so the expression picks the column set by the event's
-- statement id.
CREATE OR REPLACE FUNCTION {schema}.image_sql(log int, side "char", alias text,
                                               only_attnums int2[] DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    bounds bigint[];
    b bigint;
    i int;
    parts text := '';
    cols text;
BEGIN
    SELECT pg_catalog.array_agg(DISTINCT x ORDER BY x) INTO bounds
    FROM {schema}.logged_column c, LATERAL (VALUES (c.since), (c.until)) v(x)
    WHERE c.log_id = log AND x IS NOT NULL AND x > 0
      AND (only_attnums IS NULL OR c.attnum = ANY (only_attnums));
    bounds := ARRAY[0::bigint] || COALESCE(bounds, '{{}}');
    FOR i IN 1 .. pg_catalog.cardinality(bounds) LOOP
        b := bounds[i];
        SELECT pg_catalog.string_agg(pg_catalog.format('%I.%I%s AS %I', alias,
                   CASE WHEN side = 'o' THEN c.old_col ELSE c.new_col END,
                   {schema}.json_as_text(c.attnum, c.type), c.name),
                   ', ' ORDER BY c.attnum < 0, pg_catalog.abs(c.attnum), c.gen)
        INTO cols
        FROM {schema}.logged_column c
        WHERE c.log_id = log AND c.since <= b AND (c.until IS NULL OR c.until > b)
          AND (only_attnums IS NULL OR c.attnum = ANY (only_attnums));
        cols := pg_catalog.format('(SELECT pg_catalog.to_json(x) FROM (SELECT %s) x)',
                                  COALESCE(cols, ''));
        IF i < pg_catalog.cardinality(bounds) THEN
            parts := parts || pg_catalog.format(' WHEN %I.stmt < %s THEN %s', alias,
                                                bounds[i + 1], cols);
        ELSE
            parts := parts || ' ELSE ' || cols;
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(bounds) = 1 THEN
        RETURN cols;
    END IF;
    RETURN 'CASE' || parts || ' END';
END
$body$;

-- The three JSON columns of an event: key, old row, new row.
CREATE OR REPLACE FUNCTION {schema}.event_sql(log int, alias text)
RETURNS TABLE (row_key text, old_row text, new_row text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN t.key_attnums IS NULL THEN 'NULL::json'
                ELSE pg_catalog.format(
                    'CASE WHEN %1$I.op IN (''D'', ''T'') THEN %2$s WHEN %1$I.op = ''X'' THEN NULL'
                    ' ELSE %3$s END', alias,
                    {schema}.image_sql(log, 'o', alias, t.key_attnums),
                    {schema}.image_sql(log, 'n', alias, t.key_attnums)) END,
           pg_catalog.format('CASE WHEN %I.op IN (''U'', ''D'', ''T'') THEN %s END', alias,
                             {schema}.image_sql(log, 'o', alias)),
           pg_catalog.format('CASE WHEN %I.op IN (''I'', ''U'', ''S'') THEN %s END', alias,
                             {schema}.image_sql(log, 'n', alias))
    FROM {schema}.logged_table t WHERE t.id = log
$$;

-- {schema}.event: every event of every table, as JSON, with who and when; for reading history
-- with plain SQL (pgwarden's own readers query the history tables directly). Each table's part
-- of it is kept in logged_table.view_sql.
CREATE OR REPLACE FUNCTION {schema}.view_part(log int) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    t record;
    e record;
BEGIN
    SELECT * INTO t FROM {schema}.logged_table l WHERE l.id = log;
    SELECT * INTO e FROM {schema}.event_sql(log, 'h');
    RETURN pg_catalog.format(
        'SELECT %s::int AS log_id, %s::oid AS table_oid, %L::text AS schema_name, '
        '%L::text AS table_name, h.stmt AS stmt_id, h.ctid AS pos, h.ctx, '
        'CASE h.op WHEN ''I'' THEN ''INSERT'' WHEN ''U'' THEN ''UPDATE'' WHEN ''D'' THEN ''DELETE'' '
        'WHEN ''S'' THEN ''SNAPSHOT'' ELSE ''TRUNCATE'' END AS op, '
        '%s AS row_key, %s AS old_row, %s AS new_row, x.tx, x.at AS tx_at, x.db_user, '
        'x.role_name, x.application, x.client_addr, x.app_user, x.context, '
        's.text AS statement '
        'FROM {schema}.%I h JOIN {schema}.tx x ON x.id = h.ctx '
        'LEFT JOIN {schema}.statement s ON s.stmt = h.stmt',
        t.id, COALESCE(t.table_oid::text, 'NULL'), t.schema_name, t.table_name,
        e.row_key, e.old_row, e.new_row, t.shadow);
END
$body$;

-- Keep the table's part of the view (done whenever its columns or name change).
CREATE OR REPLACE FUNCTION {schema}.set_view_part(log int) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE {schema}.logged_table l SET view_sql = {schema}.view_part(log) WHERE l.id = log
$$;

-- Every event of every table (or of one: `log`), as the `event` view shows them. Put
-- together at each call from the tables' parts, which are remade when found missing: a table
-- tracked or changed costs no DDL on a view. Runs with the caller's rights: only roles that
-- may read history (the auditor) see anything.
CREATE OR REPLACE FUNCTION {schema}.events(log int DEFAULT NULL)
RETURNS TABLE (log_id int, table_oid oid, schema_name text, table_name text, stmt_id bigint,
               pos tid, ctx bigint, op text, row_key json, old_row json, new_row json,
               tx bigint, tx_at timestamptz, db_user text, role_name text, application text,
               client_addr inet, app_user text, context text, statement text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    parts text;
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.logged_table l
               WHERE l.view_sql IS NULL AND (events.log IS NULL OR l.id = events.log)) THEN
        -- A reader may not write: build the missing parts without keeping them.
        SELECT pg_catalog.string_agg(COALESCE(l.view_sql, {schema}.view_part(l.id)),
                                     ' UNION ALL ' ORDER BY l.id)
        INTO parts FROM {schema}.logged_table l WHERE events.log IS NULL OR l.id = events.log;
    ELSE
        SELECT pg_catalog.string_agg(l.view_sql, ' UNION ALL ' ORDER BY l.id)
        INTO parts FROM {schema}.logged_table l WHERE events.log IS NULL OR l.id = events.log;
    END IF;
    IF parts IS NOT NULL THEN
        RETURN QUERY EXECUTE parts;
    END IF;
END
$body$;
