-- Prototype capture designs, measured beside pgwarden in the same benchmark run so that the
-- ratios compare (bench/w1.py, bench/w2.py). None of this is the product: these are the
-- cheapest shapes a capture trigger can take, to show where the floor of each design is.
-- All are statement-level AFTER triggers with transition tables, like pgwarden's.
CREATE SCHEMA IF NOT EXISTS proto;

-- Who, when and what, once per statement (the designs below keep it off the per-row rows).
CREATE TABLE IF NOT EXISTS proto.stmt (
    stmt_id bigint PRIMARY KEY,
    tx bigint NOT NULL,
    tx_at timestamptz NOT NULL,
    table_oid oid NOT NULL,
    op text NOT NULL,
    db_user text NOT NULL,
    role_name text NOT NULL,
    application text,
    client_addr inet,
    app_user text
);
CREATE SEQUENCE IF NOT EXISTS proto.stmt_seq;

CREATE OR REPLACE FUNCTION proto.note_statement(sid bigint, relid oid, op text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO proto.stmt VALUES (sid, pg_current_xact_id()::text::bigint, transaction_timestamp(),
        relid, op, session_user, current_user, current_setting('application_name'),
        inet_client_addr(), NULLIF(current_setting('pgwarden.actor', true), ''))
$$;

-- The floor of any statement-level capture: the transition tables are built, nothing is written.
CREATE OR REPLACE FUNCTION proto.capture_nothing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RETURN NULL;
END $$;

-- The leanest JSON design that can still find a row by its key: per row the statement id, the
-- key, its hash and the JSONB images, written in hash order under an append-only
-- (stmt_id, key_hash) index; metadata once per statement. TG_ARGV[0]: the key column.
CREATE TABLE IF NOT EXISTS proto.json_event (
    stmt_id bigint NOT NULL,
    key_hash bigint NOT NULL,
    row_key jsonb NOT NULL,
    old_row jsonb,
    new_row jsonb
);
CREATE INDEX IF NOT EXISTS json_event_key ON proto.json_event (stmt_id, key_hash);
CREATE OR REPLACE FUNCTION proto.capture_json() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    sid bigint := nextval('proto.stmt_seq');
    k text := TG_ARGV[0];
BEGIN
    PERFORM proto.note_statement(sid, TG_RELID, TG_OP);
    IF TG_OP = 'INSERT' THEN
        INSERT INTO proto.json_event
        SELECT sid, hashtextextended(x.k::text, 0) AS h, x.k, NULL, x.j
        FROM (SELECT jsonb_build_object(k, j -> k) AS k, j
              FROM (SELECT to_jsonb(r) AS j FROM new_rows r OFFSET 0) i) x
        ORDER BY h;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO proto.json_event
        SELECT sid, hashtextextended(x.k::text, 0) AS h, x.k, x.j, NULL
        FROM (SELECT jsonb_build_object(k, j -> k) AS k, j
              FROM (SELECT to_jsonb(r) AS j FROM old_rows r OFFSET 0) i) x
        ORDER BY h;
    ELSE
        INSERT INTO proto.json_event
        SELECT sid, hashtextextended(x.k::text, 0) AS h, x.k, x.o, x.n
        FROM (SELECT jsonb_build_object(k, p.n -> k) AS k, p.o, p.n
              FROM ROWS FROM (unnest(ARRAY(SELECT to_jsonb(r) FROM old_rows r)),
                              unnest(ARRAY(SELECT to_jsonb(r) FROM new_rows r))) AS p(o, n)
              WHERE p.o IS DISTINCT FROM p.n) x
        ORDER BY h;
    END IF;
    RETURN NULL;
END $$;
