-- pgoutbox schema, version 6: fetch_candidates in PL/pgSQL, planned once per
-- session instead of at every call.
--
-- A LANGUAGE sql function with SET clauses is never inlined, and PostgreSQL
-- plans its body again at every call: about half a millisecond on the 2-core
-- development machine, paid by every fetch, and most of what separated an idle
-- worker's start latency from a bare DELETE ... SKIP LOCKED. PL/pgSQL keeps the
-- plan of RETURN QUERY for the session, and force_generic_plan makes it plan
-- once: with sequential and bitmap scans off, the generic plan is the ordered
-- index scan that migration 5 insists on. Same signature, same rows.
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
          AND j.state IN ('scheduled', 'available', 'retryable')
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
