-- What the workers' role may do, and nothing more (no DDL): run it as the owner of the
-- tables, after the migrations, with the role's name in place of queue_worker:
--     psql "$OWNER_URL" -f sql/worker_grants.sql
-- Every statement in sql/queries.sql runs with these rights (tests/test_grants.py).
GRANT SELECT, INSERT, UPDATE, DELETE ON "Tasks", "BatchLocks", "DeadLetters" TO queue_worker;
GRANT SELECT ON "QueueGauges" TO queue_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO queue_worker;
