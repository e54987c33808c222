-- pgflow_py schema version 7 (PostgreSQL): a job as one row, as SQLite's sqlite_0008_job_rows.sql.
-- A run of a job keeps its one task's state in its own row; its task's id is -seq. The
-- columns are NULL on the runs of flows; step_slug names a job's one step, task_status is its
-- task's status (NULL while it has none: a condition that did not hold).
ALTER TABLE runs
    ADD COLUMN step_slug TEXT,
    ADD COLUMN task_status TEXT,
    ADD COLUMN flow_version INTEGER,
    ADD COLUMN attempts INTEGER,
    ADD COLUMN claims INTEGER,
    ADD COLUMN max_attempts INTEGER,
    ADD COLUMN due DOUBLE PRECISION,            -- when the task is due (a retry's backoff)
    ADD COLUMN history TEXT,
    ADD COLUMN task_error TEXT,                 -- the last failed attempt's error
    ADD COLUMN lease_owner TEXT,
    ADD COLUMN lease_expires DOUBLE PRECISION,
    ADD COLUMN task_started_at DOUBLE PRECISION;  -- when the current (or last) attempt started

CREATE INDEX runs_queued ON runs (flow_slug, priority DESC, due, seq) WHERE task_status = 'queued';
CREATE INDEX runs_running ON runs (flow_slug, lease_expires) WHERE task_status = 'started';
CREATE INDEX runs_retrying ON runs (flow_slug) WHERE task_status = 'queued' AND attempts > 0;

-- Every task, of flows and of jobs, in step_tasks' columns: what reads and counts go through.
CREATE VIEW tasks AS
SELECT id, run_id, flow_slug, step_slug, flow_version, task_index, status, attempts, claims,
       max_attempts, priority, run_at, input, output, error, history, lease_owner,
       lease_expires, created_at, started_at, finished_at
FROM step_tasks
UNION ALL
SELECT -seq, id, flow_slug, step_slug, flow_version, NULL, task_status, attempts, claims,
       max_attempts, priority, due, NULL,
       CASE WHEN task_status = 'completed' THEN output END, task_error, history, lease_owner,
       lease_expires, created_at, task_started_at,
       CASE WHEN task_status IN ('completed', 'failed', 'cancelled') THEN finished_at END
FROM runs WHERE task_status IS NOT NULL;

-- The tasks of unfinished jobs move into their runs' rows (a job run's only task); those of
-- finished runs stay where they are, read through the view alike (and by a retry, run from
-- there), until pruned: the upgrade writes only what is live, however many runs are kept. A task
-- moved while claimed gets a new id: its worker's result is then late, and the attempt is
-- retried once its lease expires, as a lost worker's would be.
UPDATE runs SET step_slug = t.step_slug, task_status = t.status, flow_version = t.flow_version,
    attempts = t.attempts, claims = t.claims, max_attempts = t.max_attempts, due = t.run_at,
    history = t.history, task_error = t.error, lease_owner = t.lease_owner,
    lease_expires = t.lease_expires, task_started_at = t.started_at
FROM step_tasks t
WHERE t.run_id = runs.id AND runs.status = 'started' AND t.task_index IS NULL
    AND t.flow_slug IN (SELECT flow_slug FROM flows WHERE kind = 'job')
    AND (SELECT count(*) FROM step_tasks o WHERE o.run_id = runs.id) = 1;
DELETE FROM step_tasks WHERE task_index IS NULL AND run_id IN (
    SELECT id FROM runs WHERE task_status IS NOT NULL
);
