-- pgwarden history: capture from the WAL (history.capture: wal). Functions only; placeholders
-- as in base.sql.
--
-- A table captured from the WAL has no capture trigger: it is in the publication
-- (meta.wal_publication) with REPLICA IDENTITY FULL (complete before-images, TOASTed values
-- included), and the consumer (history/wal.py) reads the logical slot (meta.wal_slot) through
-- pgoutput and writes the same history the triggers write, in commit order.
--
-- Statement ids order history: the consumer takes them as it writes, in commit order. So a
-- schema change of such a table cannot take its boundary (logged_column.since/until,
-- shape_change, dropped_stmt) from the sequence when the DDL runs: changes committed before
-- the DDL but consumed after it would get larger ids and be read in the wrong shape. Instead
-- the DDL writes a placeholder (a negative id) and a transactional message; the consumer,
-- reaching that message in the stream, swaps the placeholders for a statement id of its own
-- (wal_resolve), exactly between the changes before the DDL and those after it.

-- Whether a table's changes reach history through the stream now (captured from the WAL and
-- attached): only then can changes be on their way that a schema change must not overtake.
CREATE OR REPLACE FUNCTION {schema}.is_wal(log int) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    -- (through to_jsonb: migration 0002 upgrading 0.1's history runs this before 0003 adds
    -- the columns)
    SELECT EXISTS (SELECT 1 FROM {schema}.tracked k JOIN {schema}.logged_table l
                   ON l.table_oid = k.table_oid
                   WHERE l.id = log AND pg_catalog.to_jsonb(k) ->> 'capture' = 'wal'
                     AND pg_catalog.to_jsonb(l) ->> 'wal_from' IS NOT NULL)
$$;

-- The statement id where a table's shape changes: now (triggers), or a placeholder that the
-- consumer resolves at the DDL's place in the stream (WAL).
CREATE OR REPLACE FUNCTION {schema}.boundary(log int) RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN {schema}.is_wal(log) THEN -pg_catalog.nextval('{schema}.statement_seq')
                ELSE pg_catalog.nextval('{schema}.statement_seq') END
$$;

CREATE OR REPLACE FUNCTION {schema}.wal_slot() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.value FROM {schema}.meta m WHERE m.key = 'wal_slot'
$$;

CREATE OR REPLACE FUNCTION {schema}.wal_publication() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.value FROM {schema}.meta m WHERE m.key = 'wal_publication'
$$;

-- The columns pgoutput sends for a table, by attribute number, in the order it sends them.
CREATE OR REPLACE FUNCTION {schema}.wal_attnums(relid oid) RETURNS int2[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT COALESCE(pg_catalog.array_agg(a.attnum ORDER BY a.attnum), '{{}}')
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = relid AND a.attnum > 0 AND NOT a.attisdropped
      AND (a.attgenerated = '' OR pg_catalog.current_setting('server_version_num')::int >= 180000)
$$;

-- Start capturing a tracked table from the WAL: no capture triggers, REPLICA IDENTITY FULL,
-- in the publication. The table is locked against writers first, so that `wal_from` (the
-- consumer skips the table's changes committed before it) falls between the last write the
-- snapshot or the triggers saw and the first one the stream will bring.
CREATE OR REPLACE FUNCTION {schema}.wal_attach(log int) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    t record;
    pub text := {schema}.wal_publication();
    slot text := {schema}.wal_slot();
    generated text;
BEGIN
    SELECT * INTO t FROM {schema}.logged_table l WHERE l.id = log;
    IF slot IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s
                                   WHERE s.slot_name = slot AND s.database = pg_catalog.current_database()) THEN
        RAISE EXCEPTION 'pgwarden: history.capture is wal but the replication slot % does not exist', slot
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'run `pgwarden apply`, which creates it (wal_level must be logical)';
    END IF;
    SELECT pg_catalog.string_agg(a.attname::text, ', ') INTO generated
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = t.table_oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> ''
      AND pg_catalog.current_setting('server_version_num')::int < 180000;
    IF generated IS NOT NULL THEN
        RAISE EXCEPTION 'pgwarden: %.% has generated columns (%), which the WAL of PostgreSQL < 18 does not carry',
            t.schema_name, t.table_name, generated
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'capture this table with triggers (history.overrides: {{capture: trigger}})';
    END IF;
    EXECUTE pg_catalog.format('LOCK TABLE %I.%I IN SHARE MODE', t.schema_name, t.table_name);
    PERFORM {schema}.drop_capture(t.schema_name, t.table_name, log);
    IF (SELECT c.relreplident FROM pg_catalog.pg_class c WHERE c.oid = t.table_oid) <> 'f' THEN
        -- Remembered, to be put back by wal_detach.
        UPDATE {schema}.tracked k
        SET wal_prior_identity = (
            SELECT CASE c.relreplident
                   WHEN 'i' THEN 'i' || (SELECT ic.relname::text
                                         FROM pg_catalog.pg_index i
                                         JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
                                         WHERE i.indrelid = c.oid AND i.indisreplident)
                   ELSE c.relreplident::text END
            FROM pg_catalog.pg_class c WHERE c.oid = t.table_oid)
        WHERE k.table_oid = t.table_oid;
        EXECUTE pg_catalog.format('ALTER TABLE %I.%I REPLICA IDENTITY FULL', t.schema_name, t.table_name);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication p WHERE p.pubname = pub) THEN
        RAISE EXCEPTION 'pgwarden: history.capture is wal but the publication % does not exist', pub
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'run `pgwarden apply`, which creates it';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel r JOIN pg_catalog.pg_publication p
                   ON p.oid = r.prpubid WHERE p.pubname = pub AND r.prrelid = t.table_oid) THEN
        EXECUTE pg_catalog.format('ALTER PUBLICATION %I ADD TABLE ONLY %I.%I', pub,
                                  t.schema_name, t.table_name);
        UPDATE {schema}.logged_table l
        SET wal_relid = t.table_oid, wal_from = pg_catalog.pg_current_wal_insert_lsn(),
            wal_attnums = {schema}.wal_attnums(t.table_oid)
        WHERE l.id = log;
    END IF;
END
$body$;

-- Stop capturing a table from the WAL (untrack, or back to triggers). Changes committed before
-- are still in the stream, and the consumer still writes them.
CREATE OR REPLACE FUNCTION {schema}.wal_detach(relid oid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    pub text := {schema}.wal_publication();
    prior text := (SELECT k.wal_prior_identity FROM {schema}.tracked k WHERE k.table_oid = relid);
    identity text := 'DEFAULT';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel r JOIN pg_catalog.pg_publication p
               ON p.oid = r.prpubid WHERE p.pubname = pub AND r.prrelid = relid) THEN
        EXECUTE pg_catalog.format('ALTER PUBLICATION %I DROP TABLE %s', pub, relid::regclass);
    END IF;
    UPDATE {schema}.logged_table l SET wal_from = NULL WHERE l.table_oid = relid;
    -- The replica identity the table had before WAL capture made it FULL (its index, when
    -- it still exists; else the default).
    IF prior IS NOT NULL
       AND (SELECT c.relreplident FROM pg_catalog.pg_class c WHERE c.oid = relid) = 'f' THEN
        IF prior = 'n' THEN
            identity := 'NOTHING';
        ELSIF prior LIKE 'i%' AND EXISTS (
                SELECT 1 FROM pg_catalog.pg_index i
                JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
                WHERE i.indrelid = relid AND ic.relname::text = pg_catalog.substr(prior, 2)) THEN
            identity := pg_catalog.format('USING INDEX %I', pg_catalog.substr(prior, 2));
        END IF;
        EXECUTE pg_catalog.format('ALTER TABLE %s REPLICA IDENTITY %s', relid::regclass, identity);
    END IF;
    UPDATE {schema}.tracked k SET wal_prior_identity = NULL WHERE k.table_oid = relid;
END
$body$;

-- After a schema change of a WAL-captured table: tell the consumer, at this place in the
-- stream, which columns the stream sends from here on; it resolves the placeholders then.
CREATE OR REPLACE FUNCTION {schema}.wal_shape_changed(log int, attnums int2[]) RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 1 FROM pg_catalog.pg_logical_emit_message(true, 'pgwarden.shape',
        pg_catalog.json_build_object('log', log, 'attnums', attnums)::text)
$$;

-- The consumer, at a shape message: every placeholder of this table becomes statement id
-- `stmt` (taken by the consumer at that place in the stream), and the stream's columns are
-- `attnums` from here on.
CREATE OR REPLACE FUNCTION {schema}.wal_resolve(log int, attnums int2[], stmt bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    PERFORM pg_catalog.set_config('pgwarden.in_track', 'on', true);
    UPDATE {schema}.logged_column c SET since = stmt WHERE c.log_id = log AND c.since < 0;
    UPDATE {schema}.logged_column c SET until = stmt WHERE c.log_id = log AND c.until < 0;
    UPDATE {schema}.shape_change s SET stmt = wal_resolve.stmt WHERE s.log_id = log AND s.stmt < 0;
    UPDATE {schema}.logged_table l
    SET dropped_stmt = CASE WHEN l.dropped_stmt < 0 THEN stmt ELSE l.dropped_stmt END,
        wal_attnums = COALESCE(attnums, l.wal_attnums), view_sql = NULL
    WHERE l.id = log;
    PERFORM {schema}.set_view_part(log);
    PERFORM pg_catalog.set_config('pgwarden.in_track', '', true);
END
$body$;

-- What the consumer writes into for a table at its position in the stream: per column the
-- stream sends (in its order), the history columns of the generation current there (written
-- since a resolved boundary, not yet closed by a resolved one); NULL for a column not captured
-- (excluded).
CREATE OR REPLACE FUNCTION {schema}.wal_slots(log int)
RETURNS TABLE (pos int, attnum int2, old_col text, new_col text, type text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.pos::int, a.attnum, c.old_col, c.new_col, c.type
    FROM {schema}.logged_table l
    CROSS JOIN LATERAL pg_catalog.unnest(l.wal_attnums) WITH ORDINALITY AS a(attnum, pos)
    LEFT JOIN {schema}.logged_column c
      ON c.log_id = l.id AND c.attnum = a.attnum AND c.since >= 0
     AND (c.until IS NULL OR c.until < 0)
    WHERE l.id = log
    ORDER BY a.pos
$$;

-- Capture starts again after a lost slot (history/wal.py, resume): the table's rows as they
-- are now become a snapshot (where replaying its history restarts), and changes committed
-- before this point are skipped in the new stream, as when tracking starts (wal_attach).
CREATE OR REPLACE FUNCTION {schema}.wal_resnapshot(log int) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    t record;
    s bigint := pg_catalog.nextval('{schema}.statement_seq');
    n bigint;
BEGIN
    SELECT * INTO t FROM {schema}.logged_table l WHERE l.id = log;
    EXECUTE pg_catalog.format('LOCK TABLE %I.%I IN SHARE MODE', t.schema_name, t.table_name);
    n := {schema}.write_rows(log, 'S', {schema}.context_id(s), s);
    UPDATE {schema}.logged_table l SET wal_from = pg_catalog.pg_current_wal_insert_lsn()
    WHERE l.id = log;
    RETURN n;
END
$body$;

-- Refuse DDL that would make WAL capture silently incomplete: a table captured from the WAL
-- taken out of the publication (ALTER PUBLICATION ... DROP/SET TABLE), the publication made to
-- leave out a kind of change (ALTER PUBLICATION ... SET (publish = ...)), or before-images cut
-- short (ALTER TABLE ... REPLICA IDENTITY). Called by the DDL event trigger after the user's
-- commands (pgwarden's own, inside track/untrack, are not checked; relid: the table an ALTER
-- TABLE changed, NULL: every table), superusers included:
-- stopping capture is `pgwarden untrack` or a switch to triggers, which history records.
CREATE OR REPLACE FUNCTION {schema}.wal_guard(tag text, relid oid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    pub text := {schema}.wal_publication();
    bad record;
BEGIN
    IF pub IS NULL THEN
        RETURN;
    END IF;
    -- The publication itself (ALTER PUBLICATION ... SET (publish = ...)): every kind of change.
    IF relid IS NULL
       AND EXISTS (SELECT 1 FROM {schema}.tracked k WHERE k.capture = 'wal')
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_publication p
                   WHERE p.pubname = pub
                     AND NOT (p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate)) THEN
        RAISE EXCEPTION 'pgwarden: % would stop complete history capture from the WAL (publication % must publish insert, update, delete and truncate)',
            tag, pub
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'switch those tables to history.capture: trigger (or untrack them) '
                         'with `pgwarden apply` first';
    END IF;
    SELECT s.* INTO bad
    FROM (SELECT k.schema_name, k.table_name, c.relreplident,
                 EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel r
                         JOIN pg_catalog.pg_publication p ON p.oid = r.prpubid
                         WHERE p.pubname = pub AND r.prrelid = k.table_oid) AS published
          FROM {schema}.tracked k JOIN pg_catalog.pg_class c ON c.oid = k.table_oid
          WHERE k.capture = 'wal' AND (relid IS NULL OR k.table_oid = relid)) s
    WHERE s.relreplident <> 'f' OR NOT s.published
    ORDER BY s.schema_name, s.table_name
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgwarden: % would stop complete history capture of %.% from the WAL (%)',
            tag, bad.schema_name, bad.table_name,
            CASE WHEN NOT bad.published THEN 'it would leave the publication ' || pub
                 ELSE 'REPLICA IDENTITY must stay FULL' END
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'untrack the table or switch it to history.capture: trigger with '
                         '`pgwarden apply` first';
    END IF;
END
$body$;
