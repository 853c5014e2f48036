-- Migration 0004: WAL capture sets REPLICA IDENTITY FULL on the tables it captures (complete
-- before-images). What a table had before is kept here, and put back when it stops being
-- captured from the WAL (untracked, or back to triggers): 'd' default, 'n' nothing, 'i' and
-- the index's name. NULL: nothing to put back (the table was FULL already, by its owner's
-- choice, or it was attached before this migration).

SET LOCAL ROLE {owner};

ALTER TABLE {schema}.tracked ADD COLUMN wal_prior_identity text;

RESET ROLE;
