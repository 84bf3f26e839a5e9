-- pgoutbox schema, version 3: headers carried with each job (e.g. trace context).
ALTER TABLE {schema}.jobs ADD COLUMN headers jsonb;
