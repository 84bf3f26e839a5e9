-- pgoutbox schema, version 11: an optional unique key per job. While a job
-- with a key is unfinished (scheduled, available, retryable or running), no
-- other job with that key can be enqueued: enqueue returns the existing one.
-- Jobs without a key are not in the index, and cost it nothing.
ALTER TABLE {schema}.jobs ADD COLUMN unique_key text;
CREATE UNIQUE INDEX jobs_unique_key_idx ON {schema}.jobs (unique_key)
    WHERE unique_key IS NOT NULL
      AND state IN ('scheduled', 'available', 'retryable', 'running');
