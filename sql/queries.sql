-- Named queries of the queue. Each starts with a "-- name: <name>" line and one line that
-- says what it does; queue_core.queries loads them by name. Parameters are always bound.
-- Every decision about a lease uses the database clock (statement_timestamp()), never
-- the worker's, and never the transaction's start time (now()), which lags behind a long
-- task.

-- name: enqueue_tasks
-- Create the lease rows of new batches and insert the tasks, in the given order; one statement.
WITH new_batches AS (
    INSERT INTO "BatchLocks" ("BatchId")
    SELECT DISTINCT batch_id FROM unnest(%(batch_ids)s::text[]) AS b (batch_id)
    ON CONFLICT DO NOTHING
)
INSERT INTO "Tasks" ("BatchId", "Payload")
SELECT batch_id, payload::jsonb
FROM unnest(%(batch_ids)s::text[], %(payloads)s::text[]) WITH ORDINALITY
    AS t (batch_id, payload, position)
ORDER BY position
RETURNING "Id";

-- name: claim_batch
-- Claim the lease of one batch whose head is ready (the preferred batch first, then the least
-- recently worked one, walking the index of batches that may have work) and count a start of
-- its head. Competing claimers skip each other's lease rows; a head still locked by a frozen
-- former owner is reported, never skipped; a batch found empty is reported (has_head false)
-- so that the caller clears its stale marker.
WITH preferred AS MATERIALIZED (
    SELECT lease."BatchId", lease."LockedBy" AS previous_owner
    FROM "BatchLocks" lease
    WHERE lease."BatchId" = %(preferred_batch_id)s
      AND lease."MaybePending"
      AND (lease."LockedBy" IS NULL
           OR lease."LockedAt" <= statement_timestamp()
                                  - make_interval(secs => %(lease_seconds)s))
      AND lease."BatchId" <> ALL (%(busy_batch_ids)s::text[])
      AND NOT EXISTS (
          SELECT FROM (
              SELECT head."NotBefore"
              FROM "Tasks" head
              WHERE head."BatchId" = lease."BatchId"
              ORDER BY head."Id"
              LIMIT 1
          ) AS head
          WHERE head."NotBefore" > statement_timestamp()
      )
    FOR NO KEY UPDATE OF lease SKIP LOCKED
),
least_recent AS MATERIALIZED (
    SELECT lease."BatchId", lease."LockedBy" AS previous_owner
    FROM "BatchLocks" lease
    WHERE NOT EXISTS (SELECT FROM preferred)
      AND lease."MaybePending"
      AND (lease."LockedBy" IS NULL
           OR lease."LockedAt" <= statement_timestamp()
                                  - make_interval(secs => %(lease_seconds)s))
      AND lease."BatchId" <> ALL (%(busy_batch_ids)s::text[])
      AND NOT EXISTS (
          SELECT FROM (
              SELECT head."NotBefore"
              FROM "Tasks" head
              WHERE head."BatchId" = lease."BatchId"
              ORDER BY head."Id"
              LIMIT 1
          ) AS head
          WHERE head."NotBefore" > statement_timestamp()
      )
    ORDER BY lease."LockedAt" ASC NULLS FIRST, lease."BatchId"
    LIMIT 1
    FOR NO KEY UPDATE OF lease SKIP LOCKED
),
candidate AS MATERIALIZED (
    SELECT * FROM preferred
    UNION ALL
    SELECT * FROM least_recent
),
head AS MATERIALIZED (
    SELECT task."Id"
    FROM "Tasks" task
    JOIN candidate ON candidate."BatchId" = task."BatchId"
    ORDER BY task."Id"
    LIMIT 1
),
-- Locks exactly the head, or nothing when another transaction holds it.
locked_head AS MATERIALIZED (
    SELECT task."Id"
    FROM "Tasks" task
    JOIN head ON head."Id" = task."Id"
    FOR NO KEY UPDATE OF task SKIP LOCKED
),
started AS (
    UPDATE "Tasks" task
    SET "Attempts" = task."Attempts" + 1
    FROM locked_head
    WHERE task."Id" = locked_head."Id"
),
claimed AS (
    UPDATE "BatchLocks" lease
    SET "LockedBy" = %(worker_id)s,
        "LockedAt" = statement_timestamp(),
        "FencingToken" = lease."FencingToken" + 1
    FROM candidate
    WHERE lease."BatchId" = candidate."BatchId"
      AND EXISTS (SELECT FROM locked_head)
    RETURNING lease."FencingToken"
)
SELECT candidate."BatchId",
       candidate.previous_owner,
       (SELECT "FencingToken" FROM claimed) AS fencing_token,
       EXISTS (SELECT FROM head) AS has_head
FROM candidate;

-- name: clear_marker
-- Clear the pending-work marker of a batch found empty, unless a transaction that inserted
-- into it is still open (see queue_clear_marker in the migrations); true when cleared.
SELECT queue_clear_marker(%(batch_id)s);

-- name: lock_head
-- Lock the head of a batch for processing, if the caller's lease still holds. Returns no row
-- when the batch is empty or the lease is gone, and a row without a task when another
-- transaction holds the head: the head is never skipped.
WITH head AS MATERIALIZED (
    SELECT task."Id"
    FROM "Tasks" task
    JOIN "BatchLocks" lease ON lease."BatchId" = task."BatchId"
    WHERE lease."BatchId" = %(batch_id)s
      AND lease."FencingToken" = %(fencing_token)s
      AND lease."LockedAt" > statement_timestamp() - make_interval(secs => %(lease_seconds)s)
    ORDER BY task."Id"
    LIMIT 1
),
locked AS MATERIALIZED (
    SELECT task."Id", task."Payload", task."Attempts", task."EnqueuedAt"
    FROM "Tasks" task
    JOIN head ON head."Id" = task."Id"
    FOR NO KEY UPDATE OF task SKIP LOCKED
)
SELECT head."Id" AS head_id, locked."Id", locked."Payload", locked."Attempts",
       locked."EnqueuedAt"
FROM head
LEFT JOIN locked ON locked."Id" = head."Id";

-- name: complete_task
-- Delete a finished task if the caller's lease still holds; renew the lease and count a start
-- of the next task (when continuing), or release the lease (when stopping). The row is always
-- locked, which fences the delete; "LockedAt" moves only once a tenth of the lease has
-- passed, so that most completions leave the indexed columns alone (a HOT update).
WITH lease AS (
    UPDATE "BatchLocks"
    SET "LockedAt" = CASE
            WHEN NOT %(keep_lease)s
                 OR "LockedAt" <= statement_timestamp()
                                  - make_interval(secs => %(lease_seconds)s / 10.0)
            THEN statement_timestamp()
            ELSE "LockedAt" END,
        "LockedBy" = CASE WHEN %(keep_lease)s THEN "LockedBy" END
    WHERE "BatchId" = %(batch_id)s
      AND "FencingToken" = %(fencing_token)s
      AND "LockedAt" > statement_timestamp() - make_interval(secs => %(lease_seconds)s)
    RETURNING "BatchId"
),
done AS (
    DELETE FROM "Tasks" task
    USING lease
    WHERE task."Id" = %(task_id)s AND task."BatchId" = lease."BatchId"
    RETURNING task."Id"
),
next_started AS (
    UPDATE "Tasks" task
    SET "Attempts" = task."Attempts" + 1
    WHERE %(keep_lease)s
      AND task."Id" = (
          SELECT next."Id"
          FROM "Tasks" next
          JOIN lease ON lease."BatchId" = next."BatchId"
          WHERE next."Id" > %(task_id)s
          ORDER BY next."Id"
          LIMIT 1
      )
)
SELECT (SELECT count(*) FROM lease) AS lease_held, (SELECT count(*) FROM done) AS deleted;

-- name: record_failure
-- Keep a failed task at the head with its error and a not-before time, and release the lease
-- so the batch is retried after the backoff; nothing changes if the lease was lost.
WITH lease AS (
    UPDATE "BatchLocks"
    SET "LockedBy" = NULL, "LockedAt" = statement_timestamp()
    WHERE "BatchId" = %(batch_id)s
      AND "FencingToken" = %(fencing_token)s
      AND "LockedAt" > statement_timestamp() - make_interval(secs => %(lease_seconds)s)
    RETURNING "BatchId"
)
UPDATE "Tasks" task
SET "LastError" = %(error)s,
    "NotBefore" = statement_timestamp() + make_interval(secs => %(retry_delay_seconds)s)
FROM lease
WHERE task."Id" = %(task_id)s AND task."BatchId" = lease."BatchId"
RETURNING task."Id";

-- name: release_lease
-- Give the lease back, if the caller still holds it; "LockedAt" keeps the time it was last
-- worked, which orders claims so that no batch starves.
UPDATE "BatchLocks"
SET "LockedBy" = NULL, "LockedAt" = statement_timestamp()
WHERE "BatchId" = %(batch_id)s AND "FencingToken" = %(fencing_token)s
  AND "LockedBy" IS NOT NULL
RETURNING "BatchId";

-- name: batch_stats
-- Per batch (or one, when batch_id is given): pending tasks, the age of the oldest, the
-- lease owner and expiry, and the head: its attempts, last error and retry time.
SELECT lease."BatchId" AS batch_id,
       tasks.pending,
       statement_timestamp() - tasks.oldest AS oldest_pending_age,
       lease."LockedBy" AS owner,
       CASE WHEN lease."LockedBy" IS NOT NULL
            THEN lease."LockedAt" + make_interval(secs => %(lease_seconds)s) END
           AS lease_expires_at,
       lease."LockedBy" IS NOT NULL
           AND lease."LockedAt" <= statement_timestamp()
                                   - make_interval(secs => %(lease_seconds)s)
           AS lease_expired,
       head."Id" AS head_id,
       head."Attempts" AS head_attempts,
       head."LastError" AS head_last_error,
       CASE WHEN head."NotBefore" > statement_timestamp() THEN head."NotBefore" END
           AS head_retry_at
FROM "BatchLocks" lease
CROSS JOIN LATERAL (
    SELECT count(*) AS pending, min(task."EnqueuedAt") AS oldest
    FROM "Tasks" task
    WHERE task."BatchId" = lease."BatchId"
) AS tasks
LEFT JOIN LATERAL (
    SELECT task."Id", task."Attempts", task."LastError", task."NotBefore"
    FROM "Tasks" task
    WHERE task."BatchId" = lease."BatchId"
    ORDER BY task."Id"
    LIMIT 1
) AS head ON true
WHERE %(batch_id)s::text IS NULL OR lease."BatchId" = %(batch_id)s
ORDER BY lease."BatchId";

-- name: dispatch_status
-- For the scheduled tick, in one statement: how many batches could be claimed now (counted up
-- to a limit), how many leases are held, and the queue's depth and oldest pending age (the
-- tick's metrics). The first two walk the index of batches that may have work, so an idle
-- queue answers from an empty index.
-- TODO: the depth is an exact count of "Tasks", read once a minute; with millions pending,
-- pg_class.reltuples (an estimate) would keep the tick cheap.
SELECT
    (SELECT count(*)
     FROM (
         SELECT
         FROM "BatchLocks" lease
         -- The head of each marked batch, one index probe each; a stale marker has none.
         CROSS JOIN LATERAL (
             SELECT head."NotBefore"
             FROM "Tasks" head
             WHERE head."BatchId" = lease."BatchId"
             ORDER BY head."Id"
             LIMIT 1
         ) AS head
         WHERE lease."MaybePending"
           AND (lease."LockedBy" IS NULL
                OR lease."LockedAt" <= statement_timestamp()
                                       - make_interval(secs => %(lease_seconds)s))
           AND (head."NotBefore" IS NULL OR head."NotBefore" <= statement_timestamp())
         LIMIT %(limit)s
     ) AS claimable) AS claimable,
    (SELECT count(*)
     FROM (
         SELECT
         FROM "BatchLocks" lease
         WHERE lease."MaybePending"
           AND lease."LockedBy" IS NOT NULL
           AND lease."LockedAt" > statement_timestamp()
                                  - make_interval(secs => %(lease_seconds)s)
         LIMIT %(limit)s
     ) AS held) AS held,
    gauges.pending,
    gauges.oldest_pending_seconds
FROM (
    SELECT count(*) AS pending,
           coalesce(extract(epoch FROM statement_timestamp() - min("EnqueuedAt")), 0)
               AS oldest_pending_seconds
    FROM "Tasks"
) AS gauges;

-- name: queue_gauges
-- The whole queue at a glance, for the metrics of a scheduled tick: pending tasks and the
-- age of the oldest. One pass over "Tasks" (no per-batch grouping).
-- TODO: the exact count reads every pending row, once a minute; with millions pending,
-- pg_class.reltuples (an estimate) would keep the tick cheap.
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM statement_timestamp() - min("EnqueuedAt")), 0)
           AS oldest_pending_seconds
FROM "Tasks";

-- name: list_leases
-- Held leases (or every lease row, when all_leases), with their owner, expiry and backlog.
SELECT lease."BatchId" AS batch_id,
       lease."LockedBy" AS owner,
       lease."FencingToken" AS fencing_token,
       lease."LockedAt" AS locked_at,
       CASE WHEN lease."LockedBy" IS NOT NULL
            THEN lease."LockedAt" + make_interval(secs => %(lease_seconds)s) END
           AS expires_at,
       lease."LockedBy" IS NOT NULL
           AND lease."LockedAt" <= statement_timestamp()
                                   - make_interval(secs => %(lease_seconds)s)
           AS expired,
       (SELECT count(*) FROM "Tasks" task WHERE task."BatchId" = lease."BatchId")
           AS pending
FROM "BatchLocks" lease
WHERE %(all_leases)s OR lease."LockedBy" IS NOT NULL
ORDER BY lease."BatchId";

-- name: force_release_lease
-- An operator frees a batch's lease: a new fencing token, so that the former owner can no
-- longer renew, complete or delete anything; only if it is still held by expected_owner
-- (when given). Returns the former owner; no row when the batch is unknown or not held.
UPDATE "BatchLocks" lease
SET "LockedBy" = NULL,
    "LockedAt" = statement_timestamp(),
    "FencingToken" = lease."FencingToken" + 1
FROM (
    SELECT "BatchId", "LockedBy" FROM "BatchLocks"
    WHERE "BatchId" = %(batch_id)s
    FOR NO KEY UPDATE
) AS previous
WHERE lease."BatchId" = previous."BatchId"
  AND lease."LockedBy" IS NOT NULL
  AND (%(expected_owner)s::text IS NULL OR lease."LockedBy" = %(expected_owner)s)
RETURNING previous."LockedBy" AS previous_owner, lease."FencingToken" AS fencing_token;

-- name: lease_owner
-- Who holds a batch's lease (NULL when free); no row when the batch does not exist.
SELECT "LockedBy" FROM "BatchLocks" WHERE "BatchId" = %(batch_id)s;

-- name: set_local_lock_timeout
-- Bound how long the rest of this transaction waits for a row lock (an operator's write
-- never queues behind a worker for long); transaction-local, so safe behind a pooler.
SELECT set_config('lock_timeout', %(lock_timeout)s, true);
