-- Poison tasks: a bounded number of attempts per task, then the batch's policy. Either the
-- task moves to "DeadLetters" and its batch goes on, or the batch halts until an operator
-- resumes it. Written, like 0001, so that running it twice changes nothing.

-- Per-batch policy; NULL means the deployment's setting (MAX_ATTEMPTS, ON_EXHAUSTED).
ALTER TABLE "BatchLocks"
    ADD COLUMN IF NOT EXISTS "MaxAttempts" integer,
    ADD COLUMN IF NOT EXISTS "OnExhausted" text,
    -- A halted batch is never claimed; an operator resumes it.
    ADD COLUMN IF NOT EXISTS "HaltedAt" timestamptz,
    ADD COLUMN IF NOT EXISTS "HaltReason" text;

ALTER TABLE "Tasks"
    ADD COLUMN IF NOT EXISTS "FirstFailedAt" timestamptz,
    ADD COLUMN IF NOT EXISTS "LastFailedAt" timestamptz,
    -- The fencing token of the lease whose claim or renewal counted the latest start. A
    -- worker only processes a head started under its own token, so a head that changed
    -- between counting and locking (an operator put tasks back ahead of it) is handed
    -- back to a fresh claim instead of running with its start uncounted.
    ADD COLUMN IF NOT EXISTS "StartToken" bigint;

CREATE TABLE IF NOT EXISTS "DeadLetters" (
    -- The task's own id, kept so that a redrive puts it back in its original place.
    "Id"             bigint PRIMARY KEY,
    "BatchId"        varchar(64) NOT NULL REFERENCES "BatchLocks" ("BatchId"),
    "Payload"        jsonb NOT NULL,
    "EnqueuedAt"     timestamptz NOT NULL,
    "Attempts"       integer NOT NULL,
    "LastError"      text,
    "FirstFailedAt"  timestamptz,
    "LastFailedAt"   timestamptz,
    "DeadLetteredAt" timestamptz NOT NULL DEFAULT now(),
    -- failed: its last allowed attempt failed; abandoned: a claim found its attempts used
    -- up without an outcome (the worker died, froze or lost its lease); cancelled: an
    -- operator cancelled its batch.
    "Reason"         text NOT NULL
);

CREATE INDEX IF NOT EXISTS "IX_DeadLetters_BatchId_Id" ON "DeadLetters" ("BatchId", "Id");

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conname = 'CK_BatchLocks_MaxAttempts') THEN
        ALTER TABLE "BatchLocks" ADD CONSTRAINT "CK_BatchLocks_MaxAttempts"
            CHECK ("MaxAttempts" BETWEEN 1 AND 1000);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conname = 'CK_BatchLocks_OnExhausted') THEN
        ALTER TABLE "BatchLocks" ADD CONSTRAINT "CK_BatchLocks_OnExhausted"
            CHECK ("OnExhausted" IN ('dead-letter', 'halt'));
    END IF;
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conname = 'CK_DeadLetters_Reason') THEN
        ALTER TABLE "DeadLetters" ADD CONSTRAINT "CK_DeadLetters_Reason"
            CHECK ("Reason" IN ('failed', 'abandoned', 'cancelled'));
    END IF;
END
$$;
