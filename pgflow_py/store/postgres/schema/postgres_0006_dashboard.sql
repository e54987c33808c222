-- pgflow_py schema version 6 (PostgreSQL): what the dashboard's runs listing reads (as
-- SQLite's sqlite_0007_dashboard.sql).

-- Runs by key, of any flow, newest first; runs_flow_key leaves out cancelled runs. Only runs
-- started with a key enter it (a keyed run's completion adds a row version here, as it does
-- to runs_flow_key already; a keyless run's never).
CREATE INDEX runs_key ON runs (key, flow_slug, seq) WHERE key IS NOT NULL;
