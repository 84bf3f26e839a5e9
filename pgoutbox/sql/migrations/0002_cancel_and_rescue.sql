-- pgoutbox schema, version 2: cancelling running jobs, rescuing dead workers' jobs,
-- pruning finished jobs.

-- Set when someone asks to cancel a running job; the worker running it
-- cancels the handler and ends the job `cancelled`.
ALTER TABLE {schema}.jobs ADD COLUMN cancel_requested_at timestamptz;

-- Each worker says how long a silence means it is dead, so rescuers need not
-- share its configuration.
ALTER TABLE {schema}.workers ADD COLUMN heartbeat_timeout float8 NOT NULL DEFAULT 30;

-- Finished jobs, oldest first, for pruning past their retention.
CREATE INDEX jobs_finished_idx ON {schema}.jobs (finished_at)
    WHERE state IN ('completed', 'failed', 'cancelled');
