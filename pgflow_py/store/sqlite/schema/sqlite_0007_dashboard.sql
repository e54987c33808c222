-- pgflow_py schema version 7 (SQLite): what the dashboard's runs listing reads.

-- Runs by key, of any flow: the unique index runs_flow_key leaves out cancelled runs, so a
-- listing by key could not use it and read every run (or every run of the flow). Only runs
-- started with a key enter this one, and completing a run does not touch it (neither key nor
-- its condition changes), so the hot path updates no index of its own still.
CREATE INDEX runs_key ON runs (key, flow_slug) WHERE key IS NOT NULL;
