-- pgflow_py schema version 2 (PostgreSQL): what store.count(), stats() and workers() read
-- (as SQLite's schema version 3).

CREATE INDEX runs_failed ON runs (flow_slug) WHERE status = 'failed';
CREATE INDEX runs_cancelled ON runs (flow_slug) WHERE status = 'cancelled';

ALTER TABLE workers ADD COLUMN lease_seconds DOUBLE PRECISION;

CREATE INDEX runs_begun ON runs (flow_slug) WHERE status = 'started' AND started_at IS NOT NULL;
CREATE INDEX step_tasks_retrying ON step_tasks (flow_slug, run_id)
    WHERE status = 'queued' AND attempts > 0;
