-- pgoutbox schema, version 1: jobs, workers.
-- {schema} is replaced by the quoted schema identifier; nothing else is templated.

CREATE TYPE {schema}.job_state AS ENUM (
    'scheduled',   -- waiting for run_at, enqueued with a delay
    'available',   -- ready to run
    'running',     -- claimed by a worker
    'retryable',   -- an attempt failed; waiting for run_at to retry
    'completed',   -- finished successfully
    'failed',      -- out of attempts, or discarded; kept as the dead-letter view
    'cancelled'    -- cancelled before or while running
);

CREATE TABLE {schema}.jobs (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue         text NOT NULL,
    task          text NOT NULL,
    args          jsonb NOT NULL,
    priority      smallint NOT NULL DEFAULT 0,
    state         {schema}.job_state NOT NULL DEFAULT 'available',
    attempt       integer NOT NULL DEFAULT 0,
    max_attempts  integer NOT NULL,
    run_at        timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    attempted_at  timestamptz,
    finished_at   timestamptz,
    worker_id     uuid,
    errors        jsonb[] NOT NULL DEFAULT ARRAY[]::jsonb[],
    CONSTRAINT jobs_attempts_positive CHECK (max_attempts > 0)
) WITH (
    -- A queue table is rewritten constantly: leave free space in each page for
    -- the new row versions, and vacuum long before the default fifth is dead.
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02
);

-- The fetch: only waiting rows are indexed, so its cost does not grow with
-- finished or running jobs.
CREATE INDEX jobs_fetch_idx ON {schema}.jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('scheduled', 'available', 'retryable');

-- When is the next delayed job due: only rows with a future run_at.
CREATE INDEX jobs_due_idx ON {schema}.jobs (run_at)
    WHERE state IN ('scheduled', 'retryable');

-- Jobs a given worker holds, for shutdown and rescue.
CREATE INDEX jobs_running_idx ON {schema}.jobs (worker_id)
    WHERE state = 'running';

CREATE TABLE {schema}.workers (
    id            uuid PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    queues        text[] NOT NULL,
    tasks         text[] NOT NULL,
    concurrency   integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
