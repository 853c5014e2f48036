-- The seed's change-history setup (../shared/seed/), exactly as written there: history_table and
-- log_user_changes() with its BEGIN … EXCEPTION block (fail-open). The fail-closed form is the
-- same function without that block, as the seed describes. Only the function names differ, so
-- both can live in one database.
CREATE TABLE IF NOT EXISTS history_table(
id SERIAL PRIMARY KEY,
table_name TEXT,
operation_type TEXT,
changed_data JSONB,
changed_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE OR REPLACE FUNCTION log_user_changes()
RETURNS TRIGGER AS $$
BEGIN
    BEGIN
        IF (TG_OP = 'INSERT') THEN
            INSERT INTO history_table (table_name, operation_type, changed_data)
            VALUES (TG_TABLE_NAME, 'INSERT', row_to_json(NEW));
            RETURN NEW;
        ELSIF (TG_OP = 'UPDATE') THEN
            INSERT INTO history_table (table_name, operation_type, changed_data)
            VALUES (TG_TABLE_NAME, 'UPDATE', jsonb_build_object('before', row_to_json(OLD), 'after', row_to_json(NEW)));
            RETURN NEW;
        ELSIF (TG_OP = 'DELETE') THEN
            INSERT INTO history_table (table_name, operation_type, changed_data)
            VALUES (TG_TABLE_NAME, 'DELETE', row_to_json(OLD));
            RETURN OLD;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'Trigger failed: %', SQLERRM;
        IF (TG_OP = 'INSERT' OR TG_OP = 'UPDATE') THEN
            RETURN NEW;
        ELSIF (TG_OP = 'DELETE') THEN
            RETURN OLD;
        END IF;
    END;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION log_user_changes_closed()
RETURNS TRIGGER AS $$
BEGIN
        IF (TG_OP = 'INSERT') THEN
            INSERT INTO history_table (table_name, operation_type, changed_data)
            VALUES (TG_TABLE_NAME, 'INSERT', row_to_json(NEW));
            RETURN NEW;
        ELSIF (TG_OP = 'UPDATE') THEN
            INSERT INTO history_table (table_name, operation_type, changed_data)
            VALUES (TG_TABLE_NAME, 'UPDATE', jsonb_build_object('before', row_to_json(OLD), 'after', row_to_json(NEW)));
            RETURN NEW;
        ELSIF (TG_OP = 'DELETE') THEN
            INSERT INTO history_table (table_name, operation_type, changed_data)
            VALUES (TG_TABLE_NAME, 'DELETE', row_to_json(OLD));
            RETURN OLD;
        END IF;
END;
$$ LANGUAGE plpgsql;
