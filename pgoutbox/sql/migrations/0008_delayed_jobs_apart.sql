-- pgoutbox schema, version 8: delayed jobs wait outside the fetch's index
-- until they are due, and a short fetch stops walking past them.
--
-- Until now jobs_fetch_idx held every waiting job, delayed or not, in the
-- order (queue, priority DESC, run_at, id), and the fetch filtered out those
-- not yet due. A fetch that found fewer jobs than it wanted read on past all
-- the delayed ones of its queue: with 100,000 jobs delayed by a day in the
-- worker's queue, an idle worker's fetch of one job took 3.5 ms instead of
-- 0.15 ms, and that is the fetch behind every job an idle worker starts. The
-- look-up of the next due time after a short fetch walked jobs_due_idx,
-- ordered by run_at alone, reading each row to check its queue and task until
-- one matched: 10 ms with 100,000 jobs delayed in another queue.
--
-- Now:
-- - jobs_fetch_idx holds only `available` jobs;
-- - jobs_due_idx holds `scheduled` and `retryable` jobs by (queue, task,
--   run_at, id);
-- - fetch_jobs first makes the due ones of its queues and tasks `available`
--   (at most max_jobs per queue and task, oldest first, skipping rows other
--   fetches hold), then claims as before; the next due time is the first
--   entry of each (queue, task) pair in jobs_due_idx. Each look-up is one
--   short index descent per pair, whatever else waits.
--
-- A delayed job is written once more on its way (to `available`).
-- fetch_candidates (migration 6), which workers of the previous version call
-- directly, claims only `available` jobs now: delayed jobs wait for a worker
-- of this version to make them available.
--
-- Both indexes are built again, with a lock that holds off writes to jobs
-- until the migration commits: quick unless millions of jobs wait.

DROP INDEX {schema}.jobs_fetch_idx;

CREATE INDEX jobs_fetch_idx ON {schema}.jobs (queue, priority DESC, run_at, id)
    WHERE state = 'available';

DROP INDEX {schema}.jobs_due_idx;

CREATE INDEX jobs_due_idx ON {schema}.jobs (queue, task, run_at, id)
    WHERE state IN ('scheduled', 'retryable');

-- The scan of waiting jobs behind the claim: `available` ones only. Same
-- signature, same rows otherwise.
CREATE OR REPLACE FUNCTION {schema}.fetch_candidates(queues text[], tasks text[], max_jobs integer)
RETURNS TABLE (id bigint, priority smallint, run_at timestamptz)
LANGUAGE plpgsql
VOLATILE
SET enable_bitmapscan = off
SET enable_seqscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $body$
#variable_conflict use_column
BEGIN
    -- One index scan per queue (a plain `queue = q.name` keeps jobs_fetch_idx
    -- in order; `queue = ANY(...)` would scan and sort every waiting row).
    RETURN QUERY
    SELECT candidate.id, candidate.priority, candidate.run_at
    FROM unnest(queues) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM {schema}.jobs AS j
        WHERE j.queue = q.name
          AND j.state = 'available'
          AND j.run_at <= now()
          AND j.task = ANY(tasks)
        ORDER BY j.priority DESC, j.run_at, j.id
        LIMIT max_jobs
        FOR UPDATE SKIP LOCKED
    ) AS candidate
    ORDER BY candidate.priority DESC, candidate.run_at, candidate.id
    LIMIT max_jobs;
END
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
          AND j.state IN ('scheduled', 'retryable');
    END IF;

    RETURN QUERY
    WITH claimed AS (
        UPDATE {schema}.jobs AS j
        SET state = 'running',
            attempt = j.attempt + 1,
            attempted_at = now(),
            worker_id = claimer,
            claim_id = claim
        WHERE j.id = ANY(ARRAY(
            SELECT c.id FROM {schema}.fetch_candidates(queues, tasks, max_jobs) AS c
        ))
        RETURNING j.id, j.queue, j.task, j.args::text AS args, j.priority, j.attempt,
                  j.max_attempts, j.created_at, j.headers::text AS headers
    )
    SELECT c.id, c.queue, c.task, c.args, c.priority, c.attempt, c.max_attempts, c.created_at,
           c.headers, NULL::bigint[], NULL::float8
    FROM claimed AS c;
    GET DIAGNOSTICS claimed_count = ROW_COUNT;

    -- When is the next delayed job due, only after a short fetch: the first
    -- entry of each (queue, task) pair in jobs_due_idx.
    RETURN QUERY
    SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::smallint, NULL::integer,
           NULL::integer, NULL::timestamptz, NULL::text, written,
           CASE WHEN claimed_count < max_jobs THEN (
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
