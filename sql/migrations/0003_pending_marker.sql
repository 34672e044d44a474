-- A per-batch marker of pending work, so that a claim walks an index of the batches that
-- may have work, in the order it wants, instead of probing every batch.
--
-- "MaybePending" is false only when the batch certainly has no pending task, and true
-- when it may have one. A trigger on "Tasks" sets it in the inserting transaction, for
-- every way of inserting (enqueue, COPY, an application's own INSERT). Only a worker
-- clears it, through queue_clear_marker() below, after it found the batch empty. A
-- stale true costs a claim one index probe and is cleared by the next claimer that
-- meets it; a stale false would hide tasks forever, and the protocol below rules it out.

ALTER TABLE "BatchLocks"
    ADD COLUMN IF NOT EXISTS "MaybePending" boolean NOT NULL DEFAULT false;

UPDATE "BatchLocks" lease
SET "MaybePending" = true
WHERE NOT lease."MaybePending"
  AND EXISTS (SELECT FROM "Tasks" task WHERE task."BatchId" = lease."BatchId");

-- The claim's walk: batches that may have work, least recently worked first.
CREATE INDEX IF NOT EXISTS "IX_BatchLocks_MaybePending_LockedAt"
    ON "BatchLocks" ("LockedAt" ASC NULLS FIRST, "BatchId")
    WHERE "MaybePending";

-- Sets the marker of every batch that received tasks, without holding a lock that the
-- batch's owner or its claimers would wait for:
-- 1. FOR KEY SHARE on the lease rows. It conflicts only with FOR UPDATE, which is what
--    queue_clear_marker() takes: from here until this transaction ends, nobody can clear
--    the marker. Owners and claimers take FOR NO KEY UPDATE and are not held up.
-- 2. Then, in READ COMMITTED, a new statement with a new snapshot: it sees every clear
--    that committed before step 1 got its lock, and sets the marker back. It writes (and
--    so holds a row lock until commit) only when the marker was false: the batch was
--    idle, so no owner and no claimer wants that row.
-- Under REPEATABLE READ or SERIALIZABLE the snapshot is older than the lock and could
-- miss a clear, so the marker is set unconditionally: a serialization failure if the row
-- changed since the snapshot (the application retries), else a row lock that makes the
-- batch's owner wait for this transaction's end.
CREATE OR REPLACE FUNCTION queue_mark_pending() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    batch_ids text[];
BEGIN
    SELECT array_agg(DISTINCT "BatchId" ORDER BY "BatchId") INTO batch_ids
    FROM inserted;

    PERFORM FROM "BatchLocks"
    WHERE "BatchId" = ANY (batch_ids)
    ORDER BY "BatchId"
    FOR KEY SHARE;

    IF current_setting('transaction_isolation') = 'read committed' THEN
        UPDATE "BatchLocks" SET "MaybePending" = true
        WHERE "BatchId" = ANY (batch_ids) AND NOT "MaybePending";
    ELSE
        UPDATE "BatchLocks" SET "MaybePending" = true
        WHERE "BatchId" = ANY (batch_ids);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS "TR_Tasks_MarkPending" ON "Tasks";
CREATE TRIGGER "TR_Tasks_MarkPending"
    AFTER INSERT ON "Tasks"
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION queue_mark_pending();

-- Clears the marker of a batch found empty; true when it did. Never waits:
-- 1. FOR UPDATE SKIP LOCKED on the lease row. Any transaction that inserted tasks into
--    the batch and has not ended holds FOR KEY SHARE on it (the trigger above, and the
--    foreign key), so the row is skipped and the marker stays: it may be pending.
-- 2. With the lock held, a new statement (a new snapshot in READ COMMITTED) sees every
--    task committed before the lock was taken; it clears only when there is none. A
--    transaction that inserts later waits for this one on its foreign-key check, then
--    sets the marker back through the trigger.
-- In any other isolation level the snapshot could predate the lock: nothing is cleared.
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
      AND NOT EXISTS (SELECT FROM "Tasks" task WHERE task."BatchId" = batch_id);
    RETURN FOUND;
END
$$;
