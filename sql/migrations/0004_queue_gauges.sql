-- The queue's depth and the age of its oldest task, cheap at any size: the scheduled tick
-- reads them once a minute for its metrics, and must not read every pending row to do it.
--
-- pending: an exact count up to 10,000 tasks; beyond that, the statistics system's count
--   of live rows in "Tasks" (kept by every committed insert and delete, about a second
--   behind). Those statistics are lost in a crash or a reset; while they read no more
--   than was counted, the planner's estimate (pg_class.reltuples, from the last VACUUM or
--   ANALYZE) stands in. Never less than the 10,001 counted.
-- oldest_pending_seconds: the age of the task with the lowest "Id", one probe of the
--   primary key. Ids are drawn at insert time and "EnqueuedAt" is its transaction's
--   start, so this is the oldest task up to the length of an enqueuing transaction.
CREATE OR REPLACE VIEW "QueueGauges" AS
SELECT CASE
           WHEN counted.pending <= 10000 THEN counted.pending
           ELSE greatest(
               counted.pending,
               CASE WHEN live.tuples > counted.pending THEN live.tuples
                    ELSE (SELECT reltuples::bigint FROM pg_class
                          WHERE oid = '"Tasks"'::regclass) END)
       END AS pending,
       greatest(
           extract(epoch FROM statement_timestamp() - (
               SELECT "EnqueuedAt" FROM "Tasks" ORDER BY "Id" LIMIT 1)),
           0) AS oldest_pending_seconds
FROM (
    SELECT count(*) AS pending FROM (SELECT FROM "Tasks" LIMIT 10001) AS capped
) AS counted
CROSS JOIN (
    SELECT pg_stat_get_live_tuples('"Tasks"'::regclass) AS tuples
) AS live;
