-- Named statements of the soak test (src/localdev/soak.py), loaded like sql/queries.sql.
-- The soak's own audit trail is written by triggers inside the queue's transactions, so it
-- holds exactly what committed: every claim (a new fencing token), every task deleted (a
-- completion, or a move to the dead letters), with the database's clock.

-- name: install_audit
-- The audit table and its triggers, in the soak's own database only.
CREATE TABLE IF NOT EXISTS "SoakEvents" (
    "Seq"     bigserial PRIMARY KEY,
    "Kind"    text NOT NULL,
    "TaskId"  bigint,
    "BatchId" text NOT NULL,
    "Token"   bigint,
    "Owner"   text,
    "At"      timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE OR REPLACE FUNCTION soak_claimed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO "SoakEvents" ("Kind", "BatchId", "Token", "Owner")
    VALUES ('claim', NEW."BatchId", NEW."FencingToken", NEW."LockedBy");
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION soak_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO "SoakEvents" ("Kind", "TaskId", "BatchId", "Token")
    SELECT 'delete', OLD."Id", OLD."BatchId", lease."FencingToken"
    FROM "BatchLocks" lease
    WHERE lease."BatchId" = OLD."BatchId";
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER soak_claimed
    AFTER UPDATE ON "BatchLocks"
    FOR EACH ROW WHEN (NEW."FencingToken" <> OLD."FencingToken")
    EXECUTE FUNCTION soak_claimed();

CREATE OR REPLACE TRIGGER soak_deleted
    AFTER DELETE ON "Tasks"
    FOR EACH ROW EXECUTE FUNCTION soak_deleted();

-- name: audit_events
-- Every claim and delete, in the order they happened.
SELECT "Kind", "TaskId", "BatchId", "Token", "Owner", "At"
FROM "SoakEvents"
ORDER BY "At", "Seq";

-- name: dead_letters
-- Every dead letter: what was given up, and why.
SELECT "Id", "BatchId", "Attempts", "Reason" FROM "DeadLetters" ORDER BY "Id";

-- name: pending_count
-- Tasks still to do.
SELECT count(*) FROM "Tasks";

-- name: terminate_worker
-- End the sessions of one soak worker, as an administrator's pg_terminate_backend would.
SELECT count(pg_terminate_backend(pid))
FROM pg_stat_activity
WHERE application_name = %(application_name)s AND datname = current_database();
