-- pgoutbox schema, version 5: the fetch's scan of waiting jobs as a function,
-- so that it can forbid the plans that read every index entry.
--
-- A queue table's statistics are nearly always stale: analyzed while few
-- jobs waited, the planner expects a handful of rows and prefers a bitmap
-- scan plus a sort, which reads every entry jobs_fetch_idx holds for the
-- queue, including the dead ones of jobs claimed since the last vacuum. Under
-- a steady flow that grows by thousands a second and made fetches take tens of
-- milliseconds. The ordered index scan stops after `max_jobs` rows and marks
-- dead entries as it passes them, so later scans skip them. The plan is made
-- without the limit's value, so with a large backlog its estimated cost is
-- high enough to trigger JIT compilation (milliseconds per call for a scan
-- that takes a fraction of one): jit is off too. SET clauses on a function
-- last only while it runs, also behind a pooler.
CREATE FUNCTION {schema}.fetch_candidates(queues text[], tasks text[], max_jobs integer)
RETURNS TABLE (id bigint, priority smallint, run_at timestamptz)
LANGUAGE sql
VOLATILE
SET enable_bitmapscan = off
SET enable_seqscan = off
SET jit = off
AS $body$
    -- One index scan per queue (a plain `queue = q.name` keeps jobs_fetch_idx
    -- in order; `queue = ANY(...)` would scan and sort every waiting row).
    SELECT candidate.id, candidate.priority, candidate.run_at
    FROM unnest(queues) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM {schema}.jobs AS j
        WHERE j.queue = q.name
          AND j.state IN ('scheduled', 'available', 'retryable')
          AND j.run_at <= now()
          AND j.task = ANY(tasks)
        ORDER BY j.priority DESC, j.run_at, j.id
        LIMIT max_jobs
        FOR UPDATE SKIP LOCKED
    ) AS candidate
    ORDER BY candidate.priority DESC, candidate.run_at, candidate.id
    LIMIT max_jobs
$body$;
