-- pgwarden history: the schema and the table that records what is installed. Runs first on
-- every install and upgrade, before the migrations. Placeholders (filled in by psycopg.sql):
-- {schema} and {owner} as quoted identifiers, {schema_name} as a string literal. Literal braces
-- are doubled.

CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {owner};
ALTER SCHEMA {schema} OWNER TO {owner};
REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;

SET LOCAL ROLE {owner};
-- schema_version: the last migration applied (history/migrations/NNNN_*.sql);
-- functions_version: a hash of the function files last installed.
CREATE TABLE IF NOT EXISTS {schema}.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
RESET ROLE;
