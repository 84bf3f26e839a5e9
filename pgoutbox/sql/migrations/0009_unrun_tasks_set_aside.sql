-- pgoutbox schema, version 9: a due job whose task no registered worker runs
-- is set aside, and fetches stop reading past it.
--
-- A fetch reads its queue's `available` jobs in fetch order and claims those
-- of its own tasks. Until now it read past the jobs of other tasks one row at
-- a time, at every fetch. That is cheap while their own workers take them,
-- and costly when nobody does: during a rolling deploy that ships a new task
-- to producers before any worker runs it, every fetch of every worker in the
-- queue read past all of the new task's waiting jobs, 5,023 row visits per
-- fetch with 5,000 of them (migration 7's test).
--
-- Now fetch_jobs locks, at the head of each queue, its own tasks' jobs and
-- the jobs of tasks that no row in `workers` runs (among workers that share a
-- queue with the fetch). It claims the first, and sets the second aside as
-- `scheduled`, with their run_at unchanged: they wait in jobs_due_idx by (queue, task), where nothing reads
-- past them, and the first fetch of a worker that runs their task makes them
-- `available` again (migration 8's step, oldest first). A fetch that set jobs
-- aside and came back short reports the next due time as 0, so the worker
-- fetches again at once instead of sleeping while its own jobs wait further
-- on. Jobs of tasks that some registered worker runs are read past as before.
--
-- Which tasks have a worker is read from `workers` only when a fetch meets a
-- job of a task not its own, once per fetch (a hashed subplan of the distinct
-- task lists of the workers that share a queue with the fetch): with 20,000
-- jobs of another worker's task read past, about 0.1 us more per row, and the
-- list itself 0.1 ms with 20 workers of 10 tasks, 1.3 ms with 200 of 50.
-- Once a fetch has met such jobs, it sets aside up to 1,000 more per queue,
-- however few slots it has free.
--
-- fetch_candidates (migration 8), which workers of versions 5 and 6 call, is
-- unchanged; workers of versions 7 and 8 call fetch_jobs, and set jobs aside too.
--
-- Also fixed: migration 8's step that makes due delayed jobs available named
-- their states in its UPDATE. A plan made while jobs_due_idx was nearly empty
-- (a worker that starts with no delayed jobs) found the rows to update by
-- walking that whole index instead of by id, at every fetch, once delayed jobs
-- filled it: 10,000 row visits per fetch with 10,000 of them
-- (tests/integration/test_plans.py). The states are now compared as text,
-- which no partial index's predicate matches, as in migration 7.

-- The tasks that the registered workers taking jobs from any of these queues
-- run, from their distinct task lists: what a fetch does not set aside. Plain
-- SQL, so that PostgreSQL can inline it into the fetch's statements, where it
-- hashes the result once per fetch.
CREATE FUNCTION {schema}.tasks_with_workers(queues text[])
RETURNS SETOF text
LANGUAGE sql
STABLE
AS $body$
    SELECT t.name
    FROM (SELECT DISTINCT w.tasks FROM {schema}.workers AS w WHERE w.queues && $1) AS w
    CROSS JOIN unnest(w.tasks) AS t(name)
$body$;

CREATE OR REPLACE FUNCTION {schema}.fetch_jobs(
    done_ids bigint[], done_attempts integer[], done_claims uuid[], keep boolean,
    queues text[], tasks text[], max_jobs integer, claimer uuid, claim uuid
)
RETURNS TABLE (
    id bigint, queue text, task text, args text, priority smallint, attempt integer,
    max_attempts integer, created_at timestamptz, headers text, done bigint[], next_due float8
)
LANGUAGE plpgsql
VOLATILE
SET enable_bitmapscan = off
SET enable_seqscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $body$
#variable_conflict use_column
DECLARE
    written bigint[] := '{{}}';
    claimed_count integer;
    ours bigint[];
    unrun bigint[];
    more bigint[];
BEGIN
    IF cardinality(done_ids) > 0 THEN
        SELECT coalesce(array_agg(ARRAY[f.id, f.attempt::bigint]), '{{}}')
        INTO written
        FROM {schema}.finish_completed(done_ids, done_attempts, done_claims, keep) AS f;
    END IF;

    -- Delayed jobs of these queues and tasks that are due become available,
    -- in a statement of their own so that the claim below sees them.
    IF max_jobs > 0 THEN
        UPDATE {schema}.jobs AS j
        SET state = 'available'
        WHERE j.id = ANY(ARRAY(
            SELECT due.id
            FROM unnest(queues) AS q(name)
            CROSS JOIN unnest(tasks) AS t(name)
            CROSS JOIN LATERAL (
                SELECT d.id
                FROM {schema}.jobs AS d
                WHERE d.queue = q.name
                  AND d.task = t.name
                  AND d.state IN ('scheduled', 'retryable')
                  AND d.run_at <= now()
                ORDER BY d.run_at, d.id
                LIMIT max_jobs
                FOR UPDATE SKIP LOCKED
            ) AS due
        ))
          -- As text: a state the planner can match to a partial index's would let
          -- a plan made while that index was nearly empty walk it whole, later.
          AND j.state::text IN ('scheduled', 'retryable');
    END IF;

    -- The head of each queue in fetch order, locked, one index scan per queue:
    -- jobs of these tasks, and jobs of tasks no registered worker runs there.
    -- The best max_jobs of the first are claimed below; the second are set aside.
    SELECT coalesce((array_agg(h.id ORDER BY h.priority DESC, h.run_at, h.id)
                     FILTER (WHERE h.mine))[1:max_jobs], '{{}}'),
           coalesce(array_agg(h.id) FILTER (WHERE NOT h.mine), '{{}}')
    INTO ours, unrun
    FROM unnest(queues) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at, j.task = ANY(tasks) AS mine
        FROM {schema}.jobs AS j
        WHERE j.queue = q.name
          AND j.state = 'available'
          AND j.run_at <= now()
          AND (j.task = ANY(tasks)
               OR j.task NOT IN (
                   SELECT r.task FROM {schema}.tasks_with_workers(fetch_jobs.queues) AS r(task)
               ))
        ORDER BY j.priority DESC, j.run_at, j.id
        LIMIT max_jobs
        FOR UPDATE OF j SKIP LOCKED
    ) AS h;

    IF cardinality(unrun) > 0 THEN
        UPDATE {schema}.jobs AS j
        SET state = 'scheduled'
        WHERE j.id = ANY(unrun) AND j.state::text = 'available';
        -- More of them may follow: set aside up to 1,000 more per queue now, so
        -- that a worker with few free slots does not move them a few at a time.
        -- (Those just set aside are `scheduled` for this scan, and skipped.)
        more := ARRAY(
            SELECT o.id
            FROM unnest(queues) AS q(name)
            CROSS JOIN LATERAL (
                SELECT j.id
                FROM {schema}.jobs AS j
                WHERE j.queue = q.name
                  AND j.state = 'available'
                  AND j.run_at <= now()
                  AND j.task <> ALL(tasks)
                  AND j.task NOT IN (
                      SELECT r.task FROM {schema}.tasks_with_workers(fetch_jobs.queues) AS r(task)
                  )
                ORDER BY j.priority DESC, j.run_at, j.id
                LIMIT 1000
                FOR UPDATE OF j SKIP LOCKED
            ) AS o
        );
        UPDATE {schema}.jobs AS j
        SET state = 'scheduled'
        WHERE j.id = ANY(more) AND j.state::text = 'available';
    END IF;

    RETURN QUERY
    WITH claimed AS (
        UPDATE {schema}.jobs AS j
        SET state = 'running',
            attempt = j.attempt + 1,
            attempted_at = now(),
            worker_id = claimer,
            claim_id = claim
        WHERE j.id = ANY(ours)
        RETURNING j.id, j.queue, j.task, j.args::text AS args, j.priority, j.attempt,
                  j.max_attempts, j.created_at, j.headers::text AS headers
    )
    SELECT c.id, c.queue, c.task, c.args, c.priority, c.attempt, c.max_attempts, c.created_at,
           c.headers, NULL::bigint[], NULL::float8
    FROM claimed AS c;
    GET DIAGNOSTICS claimed_count = ROW_COUNT;

    -- After a short fetch: 0 when jobs were set aside (this worker's own may
    -- wait further on: fetch again), else when the next delayed job is due,
    -- from the first entry of each (queue, task) pair in jobs_due_idx.
    RETURN QUERY
    SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::smallint, NULL::integer,
           NULL::integer, NULL::timestamptz, NULL::text, written,
           CASE WHEN claimed_count >= max_jobs THEN NULL
                WHEN cardinality(unrun) > 0 THEN 0::float8
                ELSE (
               SELECT extract(epoch FROM min(due.run_at) - now())::float8
               FROM unnest(queues) AS q(name)
               CROSS JOIN unnest(tasks) AS t(name)
               CROSS JOIN LATERAL (
                   SELECT j.run_at
                   FROM {schema}.jobs AS j
                   WHERE j.queue = q.name
                     AND j.task = t.name
                     AND j.state IN ('scheduled', 'retryable')
                     AND j.run_at > now()
                   ORDER BY j.run_at
                   LIMIT 1
               ) AS due
           ) END;
END
$body$;
