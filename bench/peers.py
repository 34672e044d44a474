"""Schema and jobs of the peer libraries, each in a database of its own."""

import asyncio


def available(name: str) -> str | None:
    """None when the peer can be imported, else why not."""
    module = {"pgqueuer": "pgqueuer", "procrastinate": "procrastinate"}[name]
    try:
        __import__(module)
    except Exception as error:  # any failure to import means: skip this peer
        return f"{type(error).__name__}: {error}"
    return None


def prepare_pgqueuer(url: str, jobs: int) -> None:
    asyncio.run(_prepare_pgqueuer(url, jobs))


async def _prepare_pgqueuer(url: str, jobs: int) -> None:
    import psycopg
    from pgqueuer import PsycopgDriver, Queries

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        queries = Queries(PsycopgDriver(conn))
        exists = await (
            await conn.execute("SELECT to_regclass('pgqueuer') IS NOT NULL")
        ).fetchone()
        if not exists[0]:
            await queries.install()
        await conn.execute("TRUNCATE pgqueuer, pgqueuer_log")
        for start in range(0, jobs, 5000):
            size = min(5000, jobs - start)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)


def prepare_procrastinate(url: str, batches: list[str], jobs: int, lock: bool) -> None:
    asyncio.run(_prepare_procrastinate(url, batches, jobs, lock))


async def _prepare_procrastinate(
    url: str, batches: list[str], jobs: int, lock: bool
) -> None:
    import logging

    from bench.workers import procrastinate_app

    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    app = procrastinate_app(url)
    async with app.open_async():
        rows = await app.connector.execute_query_all_async(
            "SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS present"
        )
        if not rows[0]["present"]:
            await app.schema_manager.apply_schema_async()
        await app.connector.execute_query_async("TRUNCATE procrastinate_jobs CASCADE")
        task = app.tasks["noop"]
        if not lock:
            for start in range(0, jobs, 5000):
                await task.batch_defer_async(*[{}] * min(5000, jobs - start))
            return
        # The ordered mode: one lock per batch, the jobs of a batch run one at a time
        # in the order they were deferred.
        for number in range(jobs):
            batch = batches[number % len(batches)]
            await task.configure(lock=batch).defer_async()
