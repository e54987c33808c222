-- pgflow_py schema version 3 (SQLite): what store.count(), stats() and workers() read.

-- Failed and cancelled runs, per flow: counted through these, and completed runs as all runs
-- less the unfinished, failed and cancelled ones, so that completing a run (the hot path)
-- updates no index of its own.
CREATE INDEX runs_failed ON runs (flow_slug) WHERE status = 'failed';
CREATE INDEX runs_cancelled ON runs (flow_slug) WHERE status = 'cancelled';

-- The lease a worker renews its tasks for: past it without a heartbeat, the worker is lost.
ALTER TABLE workers ADD COLUMN lease_seconds REAL;

-- The finer status of unfinished runs (see store/sql/operations.py), counted from the few
-- rows that differ from a plain queued run: runs whose first attempt has ended, and tasks
-- waiting out a backoff. A job that succeeds at its first attempt enters neither.
CREATE INDEX runs_begun ON runs (flow_slug) WHERE status = 'started' AND started_at IS NOT NULL;
CREATE INDEX step_tasks_retrying ON step_tasks (flow_slug, run_id)
    WHERE status = 'queued' AND attempts > 0;
