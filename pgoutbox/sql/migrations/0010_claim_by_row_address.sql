-- pgoutbox schema, version 10: the claim finds the jobs it locked by their
-- row address instead of looking each up again by id.
--
-- fetch_jobs locks the jobs it will claim in its scan of the queue's head,
-- then marks them running in a statement of its own. Until now that statement
-- found each job again through the primary key, one descent of the index per
-- job. It now passes the row addresses (ctid) the scan returned, and
-- PostgreSQL reads each row straight from its page (a TID scan). A row keeps
-- its address while this transaction holds its lock: nobody else can update
-- or delete it, and neither VACUUM nor pruning moves a live row. The claim
-- of 100 jobs read 100 buffers to find them instead of 203, and in 10
-- interleaved pairs of benchmarks/bench_claim.py's pgoutbox loop (3 drains
-- each) the median went from 64,450 to 66,550 jobs/s, faster in 7 pairs.
--
-- Nothing else changes: the signature, the columns, which jobs it picks, the
-- fences and the set-aside step are those of migration 9, so workers of
-- versions 7 to 9, which call fetch_jobs with the same arguments, run it
-- unchanged. Only the claimed rows come back in the order of their row
-- addresses instead of their ids; no worker relies on the order (each claimed
-- job has a free slot and starts at once).

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
    ours tid[];  -- the row addresses of the jobs to claim (since migration 10)
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
    SELECT coalesce((array_agg(h.ctid ORDER BY h.priority DESC, h.run_at, h.id)
                     FILTER (WHERE h.mine))[1:max_jobs], '{{}}'),
           coalesce(array_agg(h.id) FILTER (WHERE NOT h.mine), '{{}}')
    INTO ours, unrun
    FROM unnest(queues) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.ctid, j.priority, j.run_at, j.task = ANY(tasks) AS mine
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
        WHERE j.ctid = ANY(ours)
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
