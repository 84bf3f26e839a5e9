-- pgoutbox schema, version 7: the worker's per-batch writes as functions whose
-- plans look every job up by key, whatever the statistics say.
--
-- PostgreSQL plans a prepared statement once ("generic plan") and keeps that
-- plan until the table's statistics change. Planned while the jobs table is
-- empty, as it is when a worker starts on an idle queue and more so after an
-- autovacuum has truncated it to zero pages, every lookup by id becomes a
-- sequential scan: cheapest on an empty table. The plan outlives the empty
-- table: when a burst of 100,000 jobs arrives, each fetch and each batch of
-- completions reads the whole table, until an autoanalyze happens to
-- invalidate the plan. Planning at every call instead costs the fetch about
-- 0.7 ms on the 2-core development machine.
--
-- These functions plan once per session, like fetch_candidates (migration 6),
-- with sequential and bitmap scans off. The writes of outcomes also carry
-- `j.id = ANY(ids)`, so that every path to the jobs table is bounded by the
-- primary key: they join the outcome list for the attempts, and without that
-- condition the join walked the whole primary key (15,077 index fetches for
-- three statements in tests/integration/test_plans.py). Nested loops are off
-- for them: planned for the 10 rows a generic plan guesses, the loop put the
-- jobs first and read the whole outcome list again for each job (100 jobs:
-- 4 ms instead of a fraction of one); a hash join reads each side once.
-- `j.state::text = 'running'` keeps jobs_running_idx out of reach: its
-- predicate is `state = 'running'`, and a walk over it reads every running job
-- plus the dead entries of those finished since the last vacuum.
--
-- Migration 6's fetch_candidates stays: workers of the previous version call
-- it while a rolling deploy replaces them.

-- Complete the attempts listed (fenced: only while still running under that
-- attempt and, unless done_claims is empty, one of those claims): kept as
-- `completed`, or deleted unless `keep`. Returns the attempts written.
--
-- done_claims are the claim ids of the fetches that claimed these attempts (a
-- few per batch; one per job cost more to send than the write itself). A
-- claim lost to a crash gives its attempt number again, and then only the
-- claim id tells the run the crash interrupted from the new one.
CREATE FUNCTION {schema}.finish_completed(
    done_ids bigint[], done_attempts integer[], done_claims uuid[], keep boolean
)
RETURNS TABLE (id bigint, attempt integer)
LANGUAGE plpgsql
VOLATILE
SET enable_bitmapscan = off
SET enable_nestloop = off
SET enable_seqscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $body$
#variable_conflict use_column
BEGIN
    IF keep THEN
        RETURN QUERY
        WITH written AS (
            UPDATE {schema}.jobs AS j
            SET state = 'completed', finished_at = now(), worker_id = NULL,
                cancel_requested_at = NULL
            FROM unnest(done_ids, done_attempts) AS o(id, attempt)
            WHERE j.id = ANY(done_ids)
              AND j.id = o.id AND j.attempt = o.attempt AND j.state::text = 'running'
              AND (cardinality(done_claims) = 0 OR j.claim_id = ANY(done_claims))
            RETURNING j.id, j.attempt
        )
        SELECT written.id, written.attempt FROM written;
    ELSE
        RETURN QUERY
        WITH written AS (
            DELETE FROM {schema}.jobs AS j
            USING unnest(done_ids, done_attempts) AS o(id, attempt)
            WHERE j.id = ANY(done_ids)
              AND j.id = o.id AND j.attempt = o.attempt AND j.state::text = 'running'
              AND (cardinality(done_claims) = 0 OR j.claim_id = ANY(done_claims))
            RETURNING j.id, j.attempt
        )
        SELECT written.id, written.attempt FROM written;
    END IF;
END
$body$;

-- Write any outcomes (fenced as above). A job whose cancel was requested ends
-- `cancelled` instead of waiting again. Returns the attempts written.
CREATE FUNCTION {schema}.set_outcomes(
    outcome_ids bigint[], outcome_attempts integer[], outcome_states text[],
    outcome_delays float8[], outcome_errors jsonb[], outcome_extra_attempts integer[],
    outcome_claims uuid[]
)
RETURNS TABLE (id bigint, attempt integer)
LANGUAGE plpgsql
VOLATILE
SET enable_bitmapscan = off
SET enable_nestloop = off
SET enable_seqscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $body$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH written AS (
        UPDATE {schema}.jobs AS j
        SET state = CASE WHEN j.cancel_requested_at IS NOT NULL
                              AND o.state IN ('available', 'retryable', 'scheduled')
                         THEN 'cancelled' ELSE o.state END::{schema}.job_state,
            run_at = CASE WHEN o.delay IS NULL THEN j.run_at
                          ELSE now() + o.delay * interval '1 second' END,
            max_attempts = j.max_attempts + o.extra_attempts,
            cancel_requested_at = NULL,
            finished_at = CASE WHEN o.state IN ('completed', 'failed', 'cancelled')
                                 OR j.cancel_requested_at IS NOT NULL THEN now() END,
            errors = CASE WHEN o.error IS NULL THEN j.errors
                          ELSE array_append(j.errors, o.error) END,
            worker_id = NULL
        FROM unnest(
            outcome_ids, outcome_attempts, outcome_states, outcome_delays, outcome_errors,
            outcome_extra_attempts
        ) AS o(id, attempt, state, delay, error, extra_attempts)
        WHERE j.id = ANY(outcome_ids)
          AND j.id = o.id AND j.attempt = o.attempt AND j.state::text = 'running'
          AND (cardinality(outcome_claims) = 0 OR j.claim_id = ANY(outcome_claims))
        RETURNING j.id, j.attempt
    )
    SELECT written.id, written.attempt FROM written;
END
$body$;

-- The worker's fetch: complete the attempts listed (through finish_completed),
-- then claim up to max_jobs due jobs of these queues and tasks for one worker,
-- marked with the fetch's claim id. Returns the claimed jobs, then one last row
-- (id NULL) with the [id, attempt] pairs completed and, when fewer than
-- max_jobs were claimed, the seconds until the next delayed job of these
-- queues and tasks is due (NULL if none).
--
-- One function for the whole fetch, not one per part. Against the fetch
-- statement of migration 6's time, on the 2-core machine, an idle worker's
-- fetch of one job took 0.12 ms longer with the claim and the due time as two
-- functions called from the statement, and 0.07-0.13 ms less as one.
CREATE FUNCTION {schema}.fetch_jobs(
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

    -- When is the next delayed job due: the walk of jobs_due_idx in run_at
    -- order, only after a short fetch.
    RETURN QUERY
    SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::smallint, NULL::integer,
           NULL::integer, NULL::timestamptz, NULL::text, written,
           CASE WHEN claimed_count < max_jobs THEN (
               SELECT extract(epoch FROM min(j.run_at) - now())::float8
               FROM {schema}.jobs AS j
               WHERE j.state IN ('scheduled', 'retryable')
                 AND j.run_at > now()
                 AND j.queue = ANY(queues)
                 AND j.task = ANY(tasks)
           ) END;
END
$body$;
