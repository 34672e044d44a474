-- queue_clear_marker() as in 0003, with its check for a remaining task written so that
-- only the ("BatchId", "Id") index can answer it (see the top of sql/queries.sql). Written
-- with "=", its cached plan may scan "Tasks" expecting to meet the batch soon; for a batch
-- just drained, which is when it runs, that scan read every task of every other batch.
CREATE OR REPLACE FUNCTION queue_clear_marker(batch_id text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RETURN false;
    END IF;

    PERFORM FROM "BatchLocks" WHERE "BatchId" = batch_id FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN false;
    END IF;

    UPDATE "BatchLocks" lease SET "MaybePending" = false
    WHERE lease."BatchId" = batch_id
      AND lease."MaybePending"
      AND NOT EXISTS (
          SELECT FROM "Tasks" task
          WHERE task."BatchId" >= batch_id AND task."BatchId" <= batch_id);
    RETURN FOUND;
END
$$;
