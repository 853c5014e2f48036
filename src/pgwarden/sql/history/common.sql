-- pgwarden history: small helpers every other part uses. Functions only (re-created on each
-- upgrade); tables live in migrations/. Placeholders as in base.sql.
--
-- Every function that runs on behalf of application roles is SECURITY DEFINER, pins
-- search_path to pg_catalog, pg_temp and qualifies every name.

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

-- Key columns of a table: its primary key, else its replica identity index; NULL when it has
-- neither (its rows are then told apart by their whole content, as REPLICA IDENTITY FULL does).
CREATE OR REPLACE FUNCTION {schema}.key_attnums(relid oid) RETURNS int2[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT i.indkey::int2[]
    FROM pg_catalog.pg_index i
    WHERE i.indrelid = relid AND (i.indisprimary OR i.indisreplident)
    ORDER BY i.indisprimary DESC
    LIMIT 1
$$;

CREATE OR REPLACE FUNCTION {schema}.key_columns(relid oid) RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
    FROM pg_catalog.unnest({schema}.key_attnums(relid)) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = relid AND a.attnum = k.attnum
$$;

-- How a column's values are stored in history: in their own type, except that a domain is
-- stored as its base type (a constraint added to the domain later, NOT VALID, must not refuse
-- old values; the values are the same).
CREATE OR REPLACE FUNCTION {schema}.storage_type(typid oid, typmod int) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE base(typid, typmod, depth) AS (
        SELECT typid, typmod, 0
      UNION ALL
        SELECT t.typbasetype, t.typtypmod, b.depth + 1
        FROM base b JOIN pg_catalog.pg_type t ON t.oid = b.typid
        WHERE t.typtype = 'd'
    )
    SELECT pg_catalog.format_type(b.typid, b.typmod)
    FROM base b ORDER BY b.depth DESC LIMIT 1
$$;

-- fail-open: the statement went through but its history did not. Say so and count it.
CREATE OR REPLACE FUNCTION {schema}.note_failure(relid oid, nsp text, rel text, op text,
                                                  err_state text, err_message text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
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

-- History is append-only: even its owner cannot UPDATE, DELETE or TRUNCATE it, except that
-- retention (running as the owner) deletes rows older than history.retention.
CREATE OR REPLACE FUNCTION {schema}.forbid_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    IF TG_OP = 'DELETE'
       AND pg_catalog.current_setting('pgwarden.retention', true) = 'on'
       AND current_user = {owner_name} THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'pgwarden history is append-only: % on %.% is not allowed',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'old events are removed only by `pgwarden retention`';
END
$body$;
