-- Migration 0001: the storage of pgwarden 0.1 (one JSON event table). Written so that it also
-- brings any 0.1 install, whichever of its builds made it, to that release's final shape; on a
-- new install it is the first step, and migration 0002 converts it right away.

SET LOCAL ROLE {owner};

CREATE TABLE IF NOT EXISTS {schema}.event (
    id bigint GENERATED ALWAYS AS IDENTITY,
    stmt_id bigint NOT NULL,
    tx bigint NOT NULL,
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
ALTER TABLE {schema}.event ADD COLUMN IF NOT EXISTS kind "char" NOT NULL DEFAULT 's';

CREATE SEQUENCE IF NOT EXISTS {schema}.statement_seq;

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

CREATE TABLE IF NOT EXISTS {schema}.rule (
    pattern text PRIMARY KEY,
    schema_regex text NOT NULL,
    table_regex text NOT NULL,
    mode text NOT NULL CHECK (mode IN ('fail-closed', 'fail-open')),
    truncate_mode text NOT NULL DEFAULT 'rows' CHECK (truncate_mode IN ('rows', 'marker'))
);

CREATE TABLE IF NOT EXISTS {schema}.table_setting (
    schema_name text NOT NULL,
    table_name text NOT NULL,
    mode text CHECK (mode IN ('fail-closed', 'fail-open')),
    exclude_columns text[] NOT NULL DEFAULT '{{}}',
    truncate_mode text NOT NULL DEFAULT 'rows' CHECK (truncate_mode IN ('rows', 'marker')),
    PRIMARY KEY (schema_name, table_name)
);

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

CREATE TABLE IF NOT EXISTS {schema}.deferred (
    stmt_id bigint PRIMARY KEY,
    spool text NOT NULL,
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
