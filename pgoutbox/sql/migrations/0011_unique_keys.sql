-- pgoutbox schema, version 11: an optional unique key per job. While a job
-- with a key is unfinished (scheduled, available, retryable or running), no
-- other job with that key can be enqueued: enqueue returns the existing one.
-- Jobs without a key are not in the index, and cost it nothing.
ALTER TABLE {schema}.jobs ADD COLUMN unique_key text;
CREATE UNIQUE INDEX jobs_unique_key_idx ON {schema}.jobs (unique_key)
    WHERE unique_key IS NOT NULL
      AND state IN ('scheduled', 'available', 'retryable', 'running');

-- The unfinished job holding a key, for an enqueue whose insert found the key
-- taken. VOLATILE, so that in READ COMMITTED its query takes a snapshot of its
-- own: the holder may have committed after the enqueue's statement began (it
-- waited for it), and the job the statement's snapshot shows may be finished.
-- Sequential and bitmap scans off, as in fetch_jobs: PostgreSQL 18 caches the
-- plans of SQL functions, and one made on an empty table would scan it.
CREATE FUNCTION {schema}.unique_key_holder(wanted text)
RETURNS TABLE (id bigint, run_at timestamptz, task text, queue text)
LANGUAGE sql VOLATILE
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
    SELECT j.id, j.run_at, j.task, j.queue
    FROM {schema}.jobs AS j
    WHERE j.unique_key = wanted
      AND j.state IN ('scheduled', 'available', 'retryable', 'running')
$$;
