-- pgoutbox schema, version 4: each fetch marks the jobs it claims, so a worker
-- whose fetch committed but whose reply was lost can give exactly those back.
ALTER TABLE {schema}.jobs ADD COLUMN claim_id uuid;
