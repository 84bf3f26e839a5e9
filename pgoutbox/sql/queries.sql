-- Named statements. Each block starts with "-- name: <statement>"; the store
-- function that runs it has the same name. {schema} is the quoted schema
-- identifier; values are always bound parameters.
--
-- "-- plan: per call" marks a statement the store never prepares, so that
-- PostgreSQL plans it for the jobs table as it is at each call: a prepared
-- statement's plan, made once while the table was empty, would keep reading
-- the whole table after it filled up. Those statements run rarely (heartbeat,
-- maintenance, admin calls). The per-batch ones are prepared, and their
-- writes are functions whose plans cannot scan the table (migration 7).

-- name: schema_version
SELECT max(version) FROM {schema}.migrations

-- name: migration_lock
SELECT pg_advisory_xact_lock(hashtextextended('pgoutbox.migrate:' || %(schema)s, 0))

-- name: migration_table_create
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)

-- name: migration_applied_list
SELECT version FROM {schema}.migrations ORDER BY version

-- name: migration_record
INSERT INTO {schema}.migrations (version, name) VALUES (%(version)s, %(name)s)

-- name: job_insert
INSERT INTO {schema}.jobs (queue, task, args, priority, state, max_attempts, run_at, headers)
VALUES (
    %(queue)s, %(task)s, %(args)s::jsonb, %(priority)s,
    %(state)s::{schema}.job_state, %(max_attempts)s,
    coalesce(%(run_at)s::timestamptz, now() + %(delay)s::float8 * interval '1 second'),
    %(headers)s::jsonb
)
RETURNING id, run_at

-- name: job_insert_notify
-- job_insert with its wake-up, for a job due within `notify_within` seconds
-- (a worker that wakes for a delayed job learns when it is due, and sleeps
-- until then). Decided here, from the row: a delay counts from the start of
-- the transaction, which may be long past, and the producer's clock may differ.
WITH job AS (
    INSERT INTO {schema}.jobs (queue, task, args, priority, state, max_attempts, run_at, headers)
    VALUES (
        %(queue)s, %(task)s, %(args)s::jsonb, %(priority)s,
        %(state)s::{schema}.job_state, %(max_attempts)s,
        coalesce(%(run_at)s::timestamptz, now() + %(delay)s::float8 * interval '1 second'),
        %(headers)s::jsonb
    )
    RETURNING id, run_at
)
SELECT job.id, job.run_at,
       CASE WHEN job.run_at <= clock_timestamp() + %(notify_within)s::float8 * interval '1 second'
            THEN pg_notify(%(channel)s, %(queue)s) END
FROM job

-- name: job_insert_unique
-- job_insert for a job with a unique key: if an unfinished job holds the key,
-- nothing is written and that job comes back (its task and queue, which may
-- be others', and true: a duplicate). A holder not yet committed makes the
-- insert wait for it, as any unique index does. The holder is looked up by
-- unique_key_holder in a snapshot taken after the insert, so it is the job
-- that holds the key now, even if it committed while the insert waited. If it
-- finished in between, no row comes back, and the caller runs this again.
-- With `notify`, an inserted job due within `notify_within` seconds NOTIFYs.
WITH job AS (
    INSERT INTO {schema}.jobs (
        queue, task, args, priority, state, max_attempts, run_at, headers, unique_key
    )
    VALUES (
        %(queue)s, %(task)s, %(args)s::jsonb, %(priority)s,
        %(state)s::{schema}.job_state, %(max_attempts)s,
        coalesce(%(run_at)s::timestamptz, now() + %(delay)s::float8 * interval '1 second'),
        %(headers)s::jsonb, %(key)s
    )
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL
        AND state IN ('scheduled', 'available', 'retryable', 'running')
    DO NOTHING
    RETURNING id, run_at, task, queue
), notified AS (
    SELECT pg_notify(%(channel)s, %(queue)s)
    FROM job
    WHERE %(notify)s
      AND job.run_at <= clock_timestamp() + %(notify_within)s::float8 * interval '1 second'
)
SELECT id, run_at, NULL::text, NULL::text FROM job WHERE (SELECT count(*) FROM notified) >= 0
UNION ALL
SELECT h.id, h.run_at, h.task, h.queue
FROM {schema}.unique_key_holder(%(key)s) AS h
WHERE NOT EXISTS (SELECT FROM job)

-- name: job_insert_many
-- The jobs come as one JSON array of objects: encoded by the client in one
-- call and parsed by the server in one pass, which costs far less than one
-- text array per column. Absent keys are NULL (delay: 0). Rows come back in
-- input order: identity values follow the array order. With `notify`, each
-- queue with a job due within `notify_within` seconds gets one NOTIFY.
WITH jobs AS (
    INSERT INTO {schema}.jobs (queue, task, args, priority, state, max_attempts, run_at, headers)
    SELECT u.queue, u.task, u.args::jsonb, u.priority, u.state::{schema}.job_state,
           u.max_attempts,
           coalesce(u.run_at, now() + coalesce(u.delay, 0) * interval '1 second'),
           u.headers::jsonb
    FROM json_to_recordset(%(jobs)s::json) AS u(
        queue text, task text, args json, priority smallint, state text,
        max_attempts integer, run_at timestamptz, delay float8, headers json
    )
    RETURNING id, run_at, queue
), notified AS (
    SELECT pg_notify(%(channel)s, q)
    FROM (SELECT DISTINCT queue FROM jobs
          WHERE %(notify)s
            AND run_at <= clock_timestamp() + %(notify_within)s::float8 * interval '1 second'
         ) AS n(q)
)
SELECT id, run_at, (SELECT count(*) FROM notified) FROM jobs ORDER BY id

-- name: job_insert_many_uniform
-- job_insert_many's common case: the jobs differ only in their arguments
-- (same task, queue and options). The arguments come as one JSON array,
-- parsed once into jsonb, and only the ids come back, in input order (the
-- SELECT feeds the rows in array order, so the identity values follow it);
-- one last row carries the run_at they share. On the development machine this
-- took 14 ms per 1,000 jobs where the general statement took 23 ms: most of
-- the difference is parsing each row's JSON twice and loading 1,000 run_at.
-- The array holds `count` elements, one per job, unless a hand-made JobSpec's
-- args held more than one JSON object: an element past `count` fails the
-- statement (a cast that cannot succeed, evaluated only for such an element),
-- so nothing is written, and the caller names the spec.
WITH jobs AS (
    INSERT INTO {schema}.jobs (queue, task, args, priority, state, max_attempts, run_at, headers)
    SELECT %(queue)s::text, %(task)s::text,
           CASE WHEN a.n <= %(count)s::int8 THEN a.args
                ELSE ('element ' || a.n || ' of a batch of ' || %(count)s::int8)::jsonb END,
           %(priority)s::smallint,
           %(state)s::{schema}.job_state, %(max_attempts)s::integer,
           coalesce(%(run_at)s::timestamptz, now() + %(delay)s::float8 * interval '1 second'),
           %(headers)s::jsonb
    FROM jsonb_array_elements(%(args)s::jsonb) WITH ORDINALITY AS a(args, n)
    ORDER BY a.n
    RETURNING id
), notified AS (
    SELECT pg_notify(%(channel)s, %(queue)s::text)
    WHERE %(notify)s
      AND coalesce(%(run_at)s::timestamptz, now() + %(delay)s::float8 * interval '1 second')
          <= clock_timestamp() + %(notify_within)s::float8 * interval '1 second'
)
(SELECT id, NULL::timestamptz FROM jobs ORDER BY id)
UNION ALL
SELECT NULL, coalesce(%(run_at)s::timestamptz, now() + %(delay)s::float8 * interval '1 second')
FROM (SELECT count(*) FROM notified) AS n

-- name: job_claim
-- Claim up to `limit` due jobs into the worker's free slots and, in the same
-- statement (one round trip, one commit), complete the attempts listed in
-- done_ids/done_attempts, fenced like job_complete_many: kept as `completed`,
-- or deleted when keep_completed is false. The claimed jobs come first; one
-- last row carries only the [id, attempt] pairs completed and, when fewer
-- than `limit` jobs were claimed, the seconds until the next delayed job of
-- these queues and tasks is due (NULL if none; 0 if the fetch set aside jobs
-- of tasks no worker runs, since migration 9: fetch again at once).
--
-- A fetch that completes nothing commits without waiting for its WAL to
-- reach disk (synchronous_commit off for this transaction only): a claim lost
-- to a server crash leaves its jobs waiting as before, to run again, which
-- at-least-once allows, and any later durable commit (a completion, a
-- handler's transaction) makes it durable first, as WAL is written in order.
-- Completions must not be lost (the job would stay `running` under a live
-- worker), so a fetch that carries them commits durably.
-- The work is one function (migration 7) whose plans look jobs up by key even
-- when prepared on an empty table; since migration 8 it first makes the due
-- delayed jobs of these queues and tasks available. The statement only sets
-- the commit mode, and leaves out the function's created_at, which no worker
-- uses: formatting a timestamp for each job, and parsing it again, cost about
-- 0.8 us of the fetch statement's 17.6 per job (benchmarks/bench_claim.py).
SELECT f.id, f.queue, f.task, f.args, f.priority, f.attempt, f.max_attempts, f.headers,
       f.done, f.next_due,
       CASE WHEN f.id IS NULL AND cardinality(%(done_ids)s::bigint[]) = 0
            THEN set_config('synchronous_commit', 'off', true) END
FROM {schema}.fetch_jobs(
    %(done_ids)s::bigint[], %(done_attempts)s::integer[], %(done_claims)s::uuid[],
    %(keep_completed)s::boolean, %(queues)s::text[], %(tasks)s::text[], %(limit)s::integer,
    %(worker_id)s::uuid, %(claim_id)s::uuid
) AS f

-- name: job_release_claim
-- plan: per call
-- Give back the jobs of a fetch whose reply never arrived: they never ran, so
-- the attempt the claim counted is taken back too (no one can hold a fence on
-- it). A job whose cancel was requested meanwhile ends `cancelled`.
UPDATE {schema}.jobs
SET state = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                 ELSE 'available' END::{schema}.job_state,
    finished_at = CASE WHEN cancel_requested_at IS NOT NULL THEN now() END,
    attempt = attempt - 1,
    cancel_requested_at = NULL,
    worker_id = NULL,
    claim_id = NULL
WHERE claim_id = %(claim_id)s AND worker_id = %(worker_id)s AND state = 'running'
RETURNING id

-- name: fetch_session_start
-- plan: per call
-- Before a connection's first fetch. Hold a session advisory lock on a random
-- key for as long as this session lives: a fetch whose reply is lost may still
-- run in it, and the lock tells when it no longer can (fetch_sessions_ended).
-- False if the key is taken. And have the server end this session soon once
-- its client is gone, so that the lock is not held for hours: TCP keepalives
-- (as the worker's own), and from PostgreSQL 14 on a limit on idleness (the
-- worker's heartbeat runs on this connection, so it is never idle for long;
-- idle_ms 0 turns the limit off).
SELECT pg_try_advisory_lock(%(key)s::int8),
       set_config('tcp_keepalives_idle', '30', false),
       set_config('tcp_keepalives_interval', '10', false),
       set_config('tcp_keepalives_count', '3', false),
       CASE WHEN current_setting('server_version_num')::int >= 140000 THEN
           set_config('idle_session_timeout', %(idle_ms)s::text, false)
       END

-- name: fetch_session_check_client
-- plan: per call
-- From PostgreSQL 14 on, where the server's platform can (Linux; elsewhere
-- it refuses a value other than 0, and the worker goes without): have a
-- statement that still runs once its client has gone notice it within a
-- second and end the session, such as a fetch blocked on a row lock.
SELECT CASE WHEN current_setting('server_version_num')::int >= 140000 THEN
           set_config('client_connection_check_interval', '1000', false)
       END

-- name: fetch_sessions_ended
-- plan: per call
-- Of these keys, those whose session lock is free: the session that took it
-- has ended (or, behind a pooler in session mode, been reset, which cannot
-- happen while it runs a statement), so nothing it ran can still commit.
-- Each is locked for this statement only, and released at its end.
SELECT k FROM unnest(%(keys)s::int8[]) AS k WHERE pg_try_advisory_xact_lock(k)

-- name: job_set_outcome_many
-- A job whose cancel was requested ends `cancelled` instead of waiting again
-- (see set_outcomes, migration 7).
SELECT id, attempt
FROM {schema}.set_outcomes(
    %(ids)s::bigint[], %(attempts)s::integer[], %(states)s::text[],
    %(delays)s::float8[], %(errors)s::jsonb[], %(extra_attempts)s::integer[],
    %(claims)s::uuid[]
)

-- name: job_complete_many
-- The common case of job_set_outcome_many: attempts that completed, kept as
-- `completed` or deleted when keep_completed is false.
SELECT id, attempt
FROM {schema}.finish_completed(
    %(ids)s::bigint[], %(attempts)s::integer[], %(claims)s::uuid[], %(keep_completed)s::boolean
)

-- name: job_get
-- plan: per call
SELECT id, queue, task, args::text, priority, state::text, attempt, max_attempts,
       run_at, created_at, attempted_at, finished_at,
       array(SELECT e::text FROM unnest(errors) AS e), unique_key
FROM {schema}.jobs
WHERE id = %(id)s

-- name: worker_register
INSERT INTO {schema}.workers (id, hostname, pid, queues, tasks, concurrency, heartbeat_timeout)
VALUES (
    %(id)s, %(hostname)s, %(pid)s, %(queues)s, %(tasks)s, %(concurrency)s,
    %(heartbeat_timeout)s
)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()

-- name: worker_delete
-- plan: per call
-- A worker leaving gives back the jobs it still holds: their interrupted
-- attempt is given back too (max_attempts + 1, so attempt numbers keep
-- growing), and a job whose cancel was requested ends `cancelled`. It wakes
-- the workers of its queues: the jobs given back here or in its last outcomes
-- (interrupted, or a retry it will not run itself) start now, not at a poll.
WITH released AS (
    UPDATE {schema}.jobs
    SET state = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                     ELSE 'available' END::{schema}.job_state,
        finished_at = CASE WHEN cancel_requested_at IS NOT NULL THEN now() END,
        max_attempts = max_attempts + 1,
        cancel_requested_at = NULL,
        worker_id = NULL,
        run_at = now()
    WHERE worker_id = %(id)s AND state = 'running'
    RETURNING id
), gone AS (
    DELETE FROM {schema}.workers WHERE id = %(id)s
), notified AS (
    SELECT pg_notify(%(channel)s, q) FROM unnest(%(queues)s::text[]) AS q
)
SELECT (SELECT count(*) FROM released), (SELECT count(*) FROM notified)

-- name: job_complete_fenced
-- One attempt, in the caller's transaction; a NULL claim_id fences by attempt
-- alone. Kept as `completed` whatever the worker's retention.
SELECT id
FROM {schema}.finish_completed(
    ARRAY[%(id)s::bigint], ARRAY[%(attempt)s::integer],
    array_remove(ARRAY[%(claim_id)s::uuid], NULL), true
)

-- name: job_cancel
-- plan: per call
-- Cancel the waiting jobs among `ids` and ask the workers of the running ones
-- to cancel them (by NOTIFY; their heartbeat also reads the request). One
-- statement: a job whose worker writes its retry, or gives it back, while the
-- cancel waits for its row lock is seen in its new state and cancelled, not
-- missed between a statement for waiting jobs and one for running jobs.
WITH changed AS (
    UPDATE {schema}.jobs
    SET state = CASE WHEN state = 'running' THEN state
                     ELSE 'cancelled' END::{schema}.job_state,
        finished_at = CASE WHEN state = 'running' THEN finished_at ELSE now() END,
        cancel_requested_at = CASE WHEN state = 'running'
                                   THEN coalesce(cancel_requested_at, now())
                                   ELSE cancel_requested_at END
    WHERE id = ANY(%(ids)s::bigint[])
      AND state IN ('scheduled', 'available', 'retryable', 'running')
    RETURNING id, state = 'running' AS asked
), notified AS (
    SELECT pg_notify(%(channel)s, %(payload)s) WHERE EXISTS (SELECT FROM changed WHERE asked)
)
SELECT id, asked, (SELECT count(*) FROM notified) FROM changed

-- name: worker_heartbeat
-- plan: per call
-- Refresh our heartbeat; return whether our row still exists (false: we were
-- declared dead and our jobs rescued) and which of our jobs should be cancelled.
WITH beat AS (
    UPDATE {schema}.workers SET heartbeat_at = now() WHERE id = %(id)s RETURNING id
)
SELECT
    EXISTS (SELECT 1 FROM beat),
    array(
        SELECT id FROM {schema}.jobs
        WHERE worker_id = %(id)s AND state = 'running' AND cancel_requested_at IS NOT NULL
    )

-- name: worker_rescue_expired
-- plan: per call
-- Remove workers whose heartbeat expired and retry (or fail, when out of
-- attempts) the jobs they held, and any running job whose worker row is gone;
-- wake the workers of the queues whose jobs can run again.
-- One statement, so it never shares a transaction with other work on the
-- worker's connection; the advisory lock lets one worker at a time do it.
-- A job whose row another transaction holds (the dead worker's own
-- exactly-once transaction, open on a server session that has not noticed
-- its client is gone) is skipped, not waited for: the wait would hold the
-- worker's shared connection past its heartbeat. A later round rescues it
-- (its worker row is gone by then).
WITH lock AS (
    SELECT pg_try_advisory_xact_lock(
        hashtextextended('pgoutbox.maintenance:' || %(schema)s, 0)
    ) AS held
), dead AS (
    DELETE FROM {schema}.workers
    WHERE (SELECT held FROM lock)
      AND heartbeat_at < now() - heartbeat_timeout * interval '1 second'
      -- While the server was down nobody could beat: after a restart, give
      -- every worker a full timeout to come back before declaring it dead.
      AND pg_postmaster_start_time() < now() - heartbeat_timeout * interval '1 second'
    RETURNING id
), lost AS (
    SELECT j.id
    FROM {schema}.jobs AS j
    WHERE (SELECT held FROM lock)
      AND j.state = 'running'
      AND (j.worker_id IN (SELECT id FROM dead)
           OR NOT EXISTS (SELECT 1 FROM {schema}.workers AS w WHERE w.id = j.worker_id))
    FOR UPDATE OF j SKIP LOCKED
), rescued AS (
    UPDATE {schema}.jobs AS j
    SET state = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                     WHEN j.attempt >= j.max_attempts THEN 'failed'
                     ELSE 'retryable' END::{schema}.job_state,
        run_at = now(),
        finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL
                             OR j.attempt >= j.max_attempts THEN now() END,
        worker_id = NULL,
        errors = array_append(j.errors, jsonb_build_object(
            'attempt', j.attempt,
            -- In UTC, whatever the session's TimeZone, as the worker writes it.
            'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'type', 'pgoutbox.WorkerLost',
            'message', 'the worker running this attempt stopped sending heartbeats'
        ))
    WHERE j.id IN (SELECT id FROM lost)
    RETURNING j.id, j.queue, j.state
), notified AS (
    SELECT pg_notify(%(channel)s, q)
    FROM (SELECT DISTINCT queue FROM rescued WHERE state = 'retryable') AS r(q)
)
SELECT (SELECT count(*) FROM dead), (SELECT count(*) FROM rescued),
       (SELECT count(*) FROM notified)

-- name: job_prune
-- plan: per call
-- Delete up to `limit` finished jobs past their retention, unless another
-- worker holds the maintenance lock.
WITH lock AS (
    SELECT pg_try_advisory_xact_lock(
        hashtextextended('pgoutbox.maintenance:' || %(schema)s, 0)
    ) AS held
), doomed AS (
    SELECT id
    FROM {schema}.jobs
    WHERE (SELECT held FROM lock)
      AND state IN ('completed', 'failed', 'cancelled')
      AND finished_at < now() - least(%(completed_retention)s::float8,
                                      %(failed_retention)s::float8) * interval '1 second'
      AND finished_at < now() - CASE WHEN state = 'failed'
                                     THEN %(failed_retention)s::float8
                                     ELSE %(completed_retention)s::float8
                                END * interval '1 second'
    ORDER BY finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.jobs AS j USING doomed WHERE j.id = doomed.id

-- name: jobs_vacuum_due
-- plan: per call
-- Whether the jobs table holds at least `threshold` dead row versions (by
-- PostgreSQL's statistics, which lag by a second or so), the connected role
-- may vacuum it (as a member of the table's owner or of the database's owner,
-- as a superuser, or from PostgreSQL 17 on with the MAINTAIN privilege on the
-- table, which older servers reject as an unknown privilege: CASE keeps them
-- from evaluating it), and no other worker holds the maintenance lock; and the
-- rows updated and deleted in the table so far, by which the worker tells
-- whether anything changed since it last had the table vacuumed (rows that a
-- long transaction still sees stay dead through a vacuum). Every claimed job
-- leaves a dead entry at the head of the fetch index until a vacuum removes
-- it, and every fetch reads the pages they fill.
SELECT pg_try_advisory_xact_lock(hashtextextended('pgoutbox.maintenance:' || %(schema)s, 0))
       AND pg_stat_get_dead_tuples(c.oid) >= %(threshold)s
       AND (pg_has_role(c.relowner, 'USAGE')
            OR pg_has_role((SELECT d.datdba FROM pg_catalog.pg_database AS d
                            WHERE d.datname = current_database()), 'USAGE')
            OR CASE WHEN current_setting('server_version_num')::int >= 170000
                    THEN has_table_privilege(c.oid, 'MAINTAIN') ELSE false END),
       pg_stat_get_tuples_updated(c.oid) + pg_stat_get_tuples_deleted(c.oid)
FROM pg_catalog.pg_class AS c
WHERE c.relname = 'jobs'
  AND c.relnamespace = (SELECT n.oid FROM pg_catalog.pg_namespace AS n WHERE n.nspname = %(schema)s)

-- name: status_queues
-- plan: per call
-- Jobs per queue and state, and how long the oldest due job has waited.
SELECT queue, state::text, count(*),
       extract(epoch FROM now() - min(run_at) FILTER (
           WHERE state IN ('scheduled', 'available', 'retryable') AND run_at <= now()
       ))::float8
FROM {schema}.jobs
GROUP BY queue, state
ORDER BY queue, state

-- name: status_workers
-- plan: per call
SELECT w.id::text, w.hostname, w.pid, w.queues, w.concurrency, w.started_at,
       extract(epoch FROM now() - w.heartbeat_at)::float8,
       (SELECT count(*) FROM {schema}.jobs AS j WHERE j.worker_id = w.id AND j.state = 'running')
FROM {schema}.workers AS w
ORDER BY w.started_at

-- name: job_count_unfinished
-- plan: per call
-- By queue, for the queues that hold unfinished jobs of these tasks: how many
-- are running or due now (what a drain waits for).
SELECT queue,
       count(*) FILTER (WHERE state = 'running' OR run_at <= now())
FROM {schema}.jobs
WHERE task = ANY(%(tasks)s::text[])
  AND state IN ('scheduled', 'available', 'retryable', 'running')
GROUP BY queue
