-- Named queries of the queue. Each starts with a "-- name: <name>" line and one line that
-- says what it does; queue_core.queries loads them by name. Parameters are always bound.
-- Every decision about a lease uses the database clock (statement_timestamp()), never
-- the worker's, and never the transaction's start time (now()), which lags behind a long
-- task.
--
-- A batch's head is found with
--     WHERE t."BatchId" >= b AND t."BatchId" <= b ORDER BY t."BatchId", t."Id" LIMIT 1
-- which means "BatchId" = b ORDER BY "Id", written so that only the ("BatchId", "Id")
-- index can serve it. Written with "=", the planner may instead walk the primary key in
-- "Id" order and filter on the batch, a plan it costs as cheap when the batch holds a large
-- share of the rows, and which reads every older task of the other batches first when this
-- batch's tasks came later: 63 ms instead of 0.3 ms behind 900,000 tasks. Statements
-- that read all of one batch's tasks use the same range, for the same reason.

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
-- its head under the new fencing token. A head whose attempts are used up is not started:
-- the batch's policy is applied to it instead (it goes to the dead letters, or the batch
-- halts) and no lease is given. Competing claimers skip each other's lease rows; a head
-- still locked by a frozen former owner is reported, never skipped; a batch found empty is
-- reported (has_head false) so that the caller clears its stale marker.
-- outcome: claimed, busy, dead_lettered or halted.
WITH preferred AS MATERIALIZED (
    SELECT lease."BatchId", lease."LockedBy" AS previous_owner, lease."FencingToken",
           coalesce(lease."MaxAttempts", %(max_attempts)s) AS max_attempts,
           coalesce(lease."OnExhausted", %(on_exhausted)s) AS on_exhausted
    FROM "BatchLocks" lease
    WHERE lease."BatchId" = %(preferred_batch_id)s
      AND lease."MaybePending"
      AND lease."HaltedAt" IS NULL
      AND (lease."LockedBy" IS NULL
           OR lease."LockedAt" <= statement_timestamp()
                                  - make_interval(secs => %(lease_seconds)s))
      AND lease."BatchId" <> ALL (%(busy_batch_ids)s::text[])
      AND NOT EXISTS (
          SELECT FROM (
              SELECT head."NotBefore"
              FROM "Tasks" head
              WHERE head."BatchId" >= lease."BatchId" AND head."BatchId" <= lease."BatchId"
              ORDER BY head."BatchId", head."Id"
              LIMIT 1
          ) AS head
          WHERE head."NotBefore" > statement_timestamp()
      )
    FOR NO KEY UPDATE OF lease SKIP LOCKED
),
least_recent AS MATERIALIZED (
    SELECT lease."BatchId", lease."LockedBy" AS previous_owner, lease."FencingToken",
           coalesce(lease."MaxAttempts", %(max_attempts)s) AS max_attempts,
           coalesce(lease."OnExhausted", %(on_exhausted)s) AS on_exhausted
    FROM "BatchLocks" lease
    WHERE NOT EXISTS (SELECT FROM preferred)
      AND lease."MaybePending"
      AND lease."HaltedAt" IS NULL
      AND (lease."LockedBy" IS NULL
           OR lease."LockedAt" <= statement_timestamp()
                                  - make_interval(secs => %(lease_seconds)s))
      AND lease."BatchId" <> ALL (%(busy_batch_ids)s::text[])
      AND NOT EXISTS (
          SELECT FROM (
              SELECT head."NotBefore"
              FROM "Tasks" head
              WHERE head."BatchId" >= lease."BatchId" AND head."BatchId" <= lease."BatchId"
              ORDER BY head."BatchId", head."Id"
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
-- One probe of ("BatchId", "Id") for the candidate's head, whatever the other batches hold.
head AS MATERIALIZED (
    SELECT first."Id"
    FROM candidate
    CROSS JOIN LATERAL (
        SELECT task."Id"
        FROM "Tasks" task
        WHERE task."BatchId" >= candidate."BatchId"
          AND task."BatchId" <= candidate."BatchId"
        ORDER BY task."BatchId", task."Id"
        LIMIT 1
    ) AS first
),
-- Locks exactly the head, or nothing when another transaction holds it.
locked_head AS MATERIALIZED (
    SELECT task."Id", task."Attempts", task."LastError"
    FROM "Tasks" task
    JOIN head ON head."Id" = task."Id"
    FOR NO KEY UPDATE OF task SKIP LOCKED
),
decision AS MATERIALIZED (
    SELECT locked_head."Id",
           CASE WHEN locked_head."Attempts" < candidate.max_attempts THEN 'claimed'
                WHEN candidate.on_exhausted = 'halt' THEN 'halted'
                ELSE 'dead_lettered'
           END AS outcome
    FROM locked_head CROSS JOIN candidate
),
started AS (
    UPDATE "Tasks" task
    SET "Attempts" = task."Attempts" + 1,
        "StartToken" = candidate."FencingToken" + 1
    FROM decision CROSS JOIN candidate
    WHERE task."Id" = decision."Id" AND decision.outcome = 'claimed'
),
abandoned AS (
    DELETE FROM "Tasks" task
    USING decision
    WHERE task."Id" = decision."Id" AND decision.outcome = 'dead_lettered'
    RETURNING task.*
),
buried AS (
    INSERT INTO "DeadLetters" ("Id", "BatchId", "Payload", "EnqueuedAt", "Attempts",
                               "LastError", "FirstFailedAt", "LastFailedAt",
                               "DeadLetteredAt", "Reason")
    SELECT "Id", "BatchId", "Payload", "EnqueuedAt", "Attempts",
           coalesce("LastError", 'no error recorded: its starts ended without an outcome'
                                 || ' (the worker died, froze or lost its lease)'),
           coalesce("FirstFailedAt", statement_timestamp()), statement_timestamp(),
           statement_timestamp(), 'abandoned'
    FROM abandoned
    ON CONFLICT ("Id") DO UPDATE
    SET "BatchId" = EXCLUDED."BatchId", "Payload" = EXCLUDED."Payload",
        "EnqueuedAt" = EXCLUDED."EnqueuedAt", "Attempts" = EXCLUDED."Attempts",
        "LastError" = EXCLUDED."LastError", "FirstFailedAt" = EXCLUDED."FirstFailedAt",
        "LastFailedAt" = EXCLUDED."LastFailedAt",
        "DeadLetteredAt" = EXCLUDED."DeadLetteredAt", "Reason" = EXCLUDED."Reason"
),
-- Every decision takes a new token, so a former owner stays fenced off for good.
claimed AS (
    UPDATE "BatchLocks" lease
    SET "LockedBy" = CASE WHEN decision.outcome = 'claimed' THEN %(worker_id)s END,
        "LockedAt" = statement_timestamp(),
        "FencingToken" = lease."FencingToken" + 1,
        "HaltedAt" = CASE WHEN decision.outcome = 'halted' THEN statement_timestamp() END,
        "HaltReason" = CASE WHEN decision.outcome = 'halted' THEN
            format('task %%s: %%s of %%s attempts used, the last without an outcome'
                   || ' (the worker died, froze or lost its lease); last error: %%s',
                   locked_head."Id", locked_head."Attempts", candidate.max_attempts,
                   coalesce(locked_head."LastError", 'none'))
        END
    FROM candidate, decision, locked_head
    WHERE lease."BatchId" = candidate."BatchId"
    RETURNING lease."FencingToken"
)
SELECT candidate."BatchId",
       candidate.previous_owner,
       coalesce(decision.outcome, 'busy') AS outcome,
       (SELECT "FencingToken" FROM claimed) AS fencing_token,
       locked_head."Id" AS head_id,
       locked_head."Attempts" AS head_attempts,
       candidate.max_attempts,
       EXISTS (SELECT FROM head) AS has_head
FROM candidate
LEFT JOIN decision ON true
LEFT JOIN locked_head ON true;

-- name: bound_transaction
-- Bound the current transaction on the server, for connections that cannot carry startup
-- options (a pooler such as PgBouncer refuses them); the settings end with the transaction.
-- transaction_timeout exists from PostgreSQL 17 on: CASE keeps older servers from seeing it.
SELECT CASE WHEN current_setting('server_version_num')::int >= 170000
            THEN set_config('transaction_timeout', %(transaction_ms)s, true) END,
       set_config('idle_in_transaction_session_timeout', %(transaction_ms)s, true),
       set_config('statement_timeout', %(statement_ms)s, true),
       set_config('lock_timeout', %(lock_ms)s, true);

-- name: clear_marker
-- Clear the pending-work marker of a batch found empty, unless a transaction that inserted
-- into it is still open (see queue_clear_marker in the migrations); true when cleared.
SELECT queue_clear_marker(%(batch_id)s);

-- name: lock_head
-- Lock the head of a batch for processing, if the caller's lease still holds. Returns no row
-- when the batch is empty or the lease is gone, and a row without a task when another
-- transaction holds the head: the head is never skipped. started is false when the head's
-- start was not counted under this lease (tasks were put back ahead of it meanwhile).
WITH head AS MATERIALIZED (
    SELECT task."Id"
    FROM "Tasks" task
    WHERE task."BatchId" >= %(batch_id)s AND task."BatchId" <= %(batch_id)s
      AND EXISTS (
          SELECT FROM "BatchLocks" lease
          WHERE lease."BatchId" = %(batch_id)s
            AND lease."FencingToken" = %(fencing_token)s
            AND lease."LockedBy" IS NOT NULL
            AND lease."LockedAt" > statement_timestamp()
                                   - make_interval(secs => %(lease_seconds)s))
    ORDER BY task."BatchId", task."Id"
    LIMIT 1
),
locked AS MATERIALIZED (
    SELECT task."Id", task."Payload", task."Attempts", task."EnqueuedAt", task."StartToken"
    FROM "Tasks" task
    JOIN head ON head."Id" = task."Id"
    FOR NO KEY UPDATE OF task SKIP LOCKED
)
SELECT head."Id" AS head_id, locked."Id", locked."Payload", locked."Attempts",
       locked."EnqueuedAt",
       locked."StartToken" IS NOT DISTINCT FROM %(fencing_token)s AS started
FROM head
LEFT JOIN locked ON locked."Id" = head."Id";

-- name: complete_task
-- Delete a finished task if the caller's lease still holds. When continuing, renew the lease
-- and count a start of the next head under the same token, if that head may start now (its
-- retry time has come, its attempts are not used up); else, or when stopping, or when the
-- batch is empty, release the lease in the same statement. The row is always locked, which
-- fences the delete; while the lease is kept, "LockedAt" moves only once a tenth of the
-- lease has passed, so that most completions leave the indexed columns alone (HOT update).
WITH next AS MATERIALIZED (
    SELECT task."Id",
           (task."NotBefore" IS NULL OR task."NotBefore" <= statement_timestamp())
           AND task."Attempts" < coalesce(lease."MaxAttempts", %(max_attempts)s) AS ready
    FROM "Tasks" task
    JOIN "BatchLocks" lease ON lease."BatchId" = task."BatchId"
    WHERE task."BatchId" >= %(batch_id)s AND task."BatchId" <= %(batch_id)s
      AND task."Id" <> %(task_id)s
    ORDER BY task."BatchId", task."Id"
    LIMIT 1
),
lease AS (
    UPDATE "BatchLocks"
    SET "LockedAt" = CASE
            WHEN NOT (%(keep_lease)s AND coalesce((SELECT ready FROM next), false))
                 OR "LockedAt" <= statement_timestamp()
                                  - make_interval(secs => %(lease_seconds)s / 10.0)
            THEN statement_timestamp()
            ELSE "LockedAt" END,
        "LockedBy" = CASE WHEN %(keep_lease)s AND (SELECT ready FROM next)
                          THEN "LockedBy" END
    WHERE "BatchId" = %(batch_id)s
      AND "FencingToken" = %(fencing_token)s
      AND "LockedBy" IS NOT NULL
      AND "LockedAt" > statement_timestamp() - make_interval(secs => %(lease_seconds)s)
    RETURNING "BatchId", "LockedBy" IS NOT NULL AS kept
),
done AS (
    DELETE FROM "Tasks" task
    USING lease
    WHERE task."Id" = %(task_id)s AND task."BatchId" = lease."BatchId"
    RETURNING task."Id"
),
next_started AS (
    UPDATE "Tasks" task
    SET "Attempts" = task."Attempts" + 1,
        "StartToken" = %(fencing_token)s
    FROM lease, next
    WHERE lease.kept AND task."Id" = next."Id"
)
SELECT (SELECT count(*) FROM lease) AS lease_held,
       (SELECT count(*) FROM done) AS deleted,
       coalesce((SELECT kept FROM lease), false) AS continuing,
       EXISTS (SELECT FROM next) AS more_pending;

-- name: record_failure
-- Record a failed attempt if the caller's lease still holds, and release the lease. With
-- attempts left, the task stays at the head with its error and a not-before time. With its
-- attempts used up, the batch's policy applies: the task moves to the dead letters (the
-- batch goes on), or stays and the batch halts. outcome: retry, dead_lettered, halted, or
-- gone (an operator removed the task meanwhile); no row when the lease was lost.
WITH failed AS MATERIALIZED (
    SELECT lease."BatchId", task."Id", task."Attempts",
           coalesce(lease."MaxAttempts", %(max_attempts)s) AS max_attempts,
           coalesce(lease."OnExhausted", %(on_exhausted)s) AS on_exhausted
    FROM "BatchLocks" lease
    LEFT JOIN "Tasks" task
           ON task."Id" = %(task_id)s AND task."BatchId" = lease."BatchId"
    WHERE lease."BatchId" = %(batch_id)s
      AND lease."FencingToken" = %(fencing_token)s
      AND lease."LockedBy" IS NOT NULL
      AND lease."LockedAt" > statement_timestamp() - make_interval(secs => %(lease_seconds)s)
    FOR NO KEY UPDATE OF lease
),
decision AS MATERIALIZED (
    SELECT failed.*,
           CASE WHEN failed."Id" IS NULL THEN 'gone'
                WHEN failed."Attempts" < failed.max_attempts THEN 'retry'
                WHEN failed.on_exhausted = 'halt' THEN 'halted'
                ELSE 'dead_lettered'
           END AS outcome
    FROM failed
),
lease AS (
    UPDATE "BatchLocks" lease
    SET "LockedBy" = NULL,
        "LockedAt" = statement_timestamp(),
        "HaltedAt" = CASE WHEN decision.outcome = 'halted' THEN statement_timestamp() END,
        "HaltReason" = CASE WHEN decision.outcome = 'halted' THEN
            format('task %%s: failed its last allowed attempt (%%s of %%s): %%s',
                   decision."Id", decision."Attempts", decision.max_attempts,
                   %(error)s::text)
        END
    FROM decision
    WHERE lease."BatchId" = decision."BatchId"
),
kept AS (
    UPDATE "Tasks" task
    SET "LastError" = %(error)s,
        "FirstFailedAt" = coalesce(task."FirstFailedAt", statement_timestamp()),
        "LastFailedAt" = statement_timestamp(),
        "NotBefore" = CASE WHEN decision.outcome = 'retry' THEN
            statement_timestamp() + make_interval(secs => %(retry_delay_seconds)s) END
    FROM decision
    WHERE task."Id" = decision."Id" AND decision.outcome IN ('retry', 'halted')
),
dead AS (
    DELETE FROM "Tasks" task
    USING decision
    WHERE task."Id" = decision."Id" AND decision.outcome = 'dead_lettered'
    RETURNING task.*
),
buried AS (
    INSERT INTO "DeadLetters" ("Id", "BatchId", "Payload", "EnqueuedAt", "Attempts",
                               "LastError", "FirstFailedAt", "LastFailedAt",
                               "DeadLetteredAt", "Reason")
    SELECT "Id", "BatchId", "Payload", "EnqueuedAt", "Attempts", %(error)s,
           coalesce("FirstFailedAt", statement_timestamp()), statement_timestamp(),
           statement_timestamp(), 'failed'
    FROM dead
    ON CONFLICT ("Id") DO UPDATE
    SET "BatchId" = EXCLUDED."BatchId", "Payload" = EXCLUDED."Payload",
        "EnqueuedAt" = EXCLUDED."EnqueuedAt", "Attempts" = EXCLUDED."Attempts",
        "LastError" = EXCLUDED."LastError", "FirstFailedAt" = EXCLUDED."FirstFailedAt",
        "LastFailedAt" = EXCLUDED."LastFailedAt",
        "DeadLetteredAt" = EXCLUDED."DeadLetteredAt", "Reason" = EXCLUDED."Reason"
)
SELECT decision."Id", decision.outcome, decision."Attempts", decision.max_attempts
FROM decision;

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
    WHERE task."BatchId" >= lease."BatchId" AND task."BatchId" <= lease."BatchId"
) AS tasks
LEFT JOIN LATERAL (
    SELECT task."Id", task."Attempts", task."LastError", task."NotBefore"
    FROM "Tasks" task
    WHERE task."BatchId" >= lease."BatchId" AND task."BatchId" <= lease."BatchId"
    ORDER BY task."BatchId", task."Id"
    LIMIT 1
) AS head ON true
WHERE %(batch_id)s::text IS NULL OR lease."BatchId" = %(batch_id)s
ORDER BY lease."BatchId";

-- name: dispatch_status
-- For the scheduled tick, in one statement: how many batches could be claimed now (counted up
-- to a limit), how many leases are held, and the queue's depth and oldest pending age (the
-- tick's metrics). The first two walk the index of batches that may have work, so an idle
-- queue answers from an empty index; the gauges stay cheap at any depth ("QueueGauges").
SELECT
    (SELECT count(*)
     FROM (
         SELECT
         FROM "BatchLocks" lease
         -- The head of each marked batch, one index probe each; a stale marker has none.
         CROSS JOIN LATERAL (
             SELECT head."NotBefore"
             FROM "Tasks" head
             WHERE head."BatchId" >= lease."BatchId" AND head."BatchId" <= lease."BatchId"
             ORDER BY head."BatchId", head."Id"
             LIMIT 1
         ) AS head
         WHERE lease."MaybePending"
           AND lease."HaltedAt" IS NULL
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
FROM "QueueGauges" AS gauges;

-- name: queue_gauges
-- The whole queue at a glance: pending tasks (exact up to 10,000, estimated beyond) and
-- the age of the oldest (see the "QueueGauges" view in the migrations).
SELECT pending, oldest_pending_seconds FROM "QueueGauges";

-- name: set_local_lock_timeout
-- Bound how long the rest of this transaction waits for a row lock (an operator's write
-- never queues behind a worker for long); transaction-local, so safe behind a pooler.
SELECT set_config('lock_timeout', %(lock_timeout)s, true);

-- name: list_batches
-- The operator's view of every batch (or one): its lease, policy, halt, head and dead letters.
SELECT lease."BatchId",
       lease."LockedBy",
       lease."FencingToken",
       lease."LockedBy" IS NOT NULL
           AND lease."LockedAt" > statement_timestamp()
                                  - make_interval(secs => %(lease_seconds)s) AS live,
       CASE WHEN lease."LockedBy" IS NOT NULL
            THEN lease."LockedAt" + make_interval(secs => %(lease_seconds)s) END
           AS lease_expires_at,
       lease."MaxAttempts",
       lease."OnExhausted",
       lease."HaltedAt",
       lease."HaltReason",
       (SELECT count(*) FROM "Tasks" task
        WHERE task."BatchId" >= lease."BatchId" AND task."BatchId" <= lease."BatchId")
           AS pending,
       head."Id", head."Attempts", head."NotBefore", head."LastError",
       (SELECT count(*) FROM "DeadLetters" dead WHERE dead."BatchId" = lease."BatchId")
           AS dead_letters
FROM "BatchLocks" lease
LEFT JOIN LATERAL (
    SELECT task."Id", task."Attempts", task."NotBefore", task."LastError"
    FROM "Tasks" task
    WHERE task."BatchId" >= lease."BatchId" AND task."BatchId" <= lease."BatchId"
    ORDER BY task."BatchId", task."Id"
    LIMIT 1
) AS head ON true
WHERE %(batch_id)s::text IS NULL OR lease."BatchId" = %(batch_id)s
ORDER BY lease."BatchId";

-- name: lock_batch
-- Lock a batch's lease row for an operator action. Every path that touches a batch takes
-- its lease row before its tasks, and operators never wait for a task row after it.
SELECT "BatchId", "LockedBy", "HaltedAt"
FROM "BatchLocks"
WHERE "BatchId" = %(batch_id)s
FOR NO KEY UPDATE;

-- name: revoke_lease
-- Take a batch's lease from its owner, live or not. The new token fences off every later
-- write of the former owner; its task in flight stays pending, for the next claim.
UPDATE "BatchLocks"
SET "LockedBy" = NULL,
    "LockedAt" = statement_timestamp(),
    "FencingToken" = "FencingToken" + 1
WHERE "BatchId" = %(batch_id)s
RETURNING "FencingToken";

-- name: resume_batch
-- Lift a batch's halt; its head gets a fresh set of attempts, to start at the next claim.
-- A head row held by another transaction is skipped (and reported), never waited for.
WITH resumed AS (
    UPDATE "BatchLocks"
    SET "HaltedAt" = NULL, "HaltReason" = NULL
    WHERE "BatchId" = %(batch_id)s
    RETURNING "BatchId"
),
head AS MATERIALIZED (
    SELECT task."Id"
    FROM "Tasks" task
    WHERE task."BatchId" >= %(batch_id)s AND task."BatchId" <= %(batch_id)s
    ORDER BY task."BatchId", task."Id"
    LIMIT 1
),
locked_head AS MATERIALIZED (
    SELECT task."Id"
    FROM "Tasks" task
    JOIN head ON head."Id" = task."Id"
    FOR NO KEY UPDATE OF task SKIP LOCKED
),
reset AS (
    UPDATE "Tasks" task
    SET "Attempts" = 0, "NotBefore" = NULL
    FROM locked_head, resumed
    WHERE task."Id" = locked_head."Id"
    RETURNING task."Id"
)
SELECT (SELECT "Id" FROM head) AS head_id,
       (SELECT "Id" FROM reset) AS reset_id,
       (SELECT count(*) FROM resumed) AS resumed;

-- name: set_batch_policy
-- Set a batch's own attempt limit and exhaustion policy (NULL: the deployment's), creating
-- its lease row when the batch has no task yet.
INSERT INTO "BatchLocks" ("BatchId", "MaxAttempts", "OnExhausted")
VALUES (%(batch_id)s, %(max_attempts)s, %(on_exhausted)s)
ON CONFLICT ("BatchId") DO UPDATE
SET "MaxAttempts" = CASE WHEN %(set_max_attempts)s THEN EXCLUDED."MaxAttempts"
                         ELSE "BatchLocks"."MaxAttempts" END,
    "OnExhausted" = CASE WHEN %(set_on_exhausted)s THEN EXCLUDED."OnExhausted"
                         ELSE "BatchLocks"."OnExhausted" END
RETURNING "MaxAttempts", "OnExhausted";

-- name: cancel_batch
-- Move a batch's pending tasks to the dead letters, as cancelled (to redrive or purge
-- later). A task in flight, its row held by a worker, is skipped: it finishes or fails
-- on its own. The caller holds the batch's lease row.
WITH picked AS MATERIALIZED (
    SELECT pending."Id"
    FROM "Tasks" pending
    WHERE pending."BatchId" >= %(batch_id)s AND pending."BatchId" <= %(batch_id)s
    FOR UPDATE SKIP LOCKED
),
cancelled AS (
    DELETE FROM "Tasks" task
    USING picked
    WHERE task."Id" = picked."Id"
      -- Restated so that the delete, too, reads only this batch's index entries.
      AND task."BatchId" >= %(batch_id)s AND task."BatchId" <= %(batch_id)s
    RETURNING task.*
),
buried AS (
    INSERT INTO "DeadLetters" ("Id", "BatchId", "Payload", "EnqueuedAt", "Attempts",
                               "LastError", "FirstFailedAt", "LastFailedAt",
                               "DeadLetteredAt", "Reason")
    SELECT "Id", "BatchId", "Payload", "EnqueuedAt", "Attempts", "LastError",
           "FirstFailedAt", "LastFailedAt", statement_timestamp(), 'cancelled'
    FROM cancelled
)
SELECT "Id" FROM cancelled ORDER BY "Id";

-- name: pending_task_ids
-- The ids of a batch's pending tasks, in order.
SELECT "Id" FROM "Tasks"
WHERE "BatchId" >= %(batch_id)s AND "BatchId" <= %(batch_id)s
ORDER BY "BatchId", "Id";

-- name: list_dead_letters
-- Dead letters, of one batch or all, in batch and original order.
SELECT "Id", "BatchId", "Payload", "EnqueuedAt", "Attempts", "LastError",
       "FirstFailedAt", "LastFailedAt", "DeadLetteredAt", "Reason"
FROM "DeadLetters"
WHERE %(batch_id)s::text IS NULL OR "BatchId" = %(batch_id)s
ORDER BY "BatchId", "Id"
LIMIT %(limit)s;

-- name: dead_letter_batches
-- The batches that have dead letters (of one batch, when given).
SELECT DISTINCT "BatchId"
FROM "DeadLetters"
WHERE %(batch_id)s::text IS NULL OR "BatchId" = %(batch_id)s
ORDER BY "BatchId";

-- name: redrive_batch
-- Put a batch's dead letters (all, or the given ids) back among its tasks under their
-- original ids: in their original order, ahead of every task enqueued after them, with a
-- fresh set of attempts. The caller holds the batch's lease row.
WITH revived AS (
    DELETE FROM "DeadLetters"
    WHERE "BatchId" = %(batch_id)s
      AND (%(ids)s::bigint[] IS NULL OR "Id" = ANY (%(ids)s::bigint[]))
    RETURNING *
)
INSERT INTO "Tasks" ("Id", "BatchId", "Payload", "EnqueuedAt", "Attempts", "LastError")
SELECT "Id", "BatchId", "Payload", "EnqueuedAt", 0, "LastError"
FROM revived
ORDER BY "Id"
RETURNING "Id";

-- name: purge_dead_letters
-- Delete dead letters for good: of one batch or all, all of them or the given ids.
DELETE FROM "DeadLetters"
WHERE (%(batch_id)s::text IS NULL OR "BatchId" = %(batch_id)s)
  AND (%(ids)s::bigint[] IS NULL OR "Id" = ANY (%(ids)s::bigint[]))
RETURNING "Id";
