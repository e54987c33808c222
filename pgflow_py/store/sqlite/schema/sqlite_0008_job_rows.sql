-- pgflow_py schema version 8 (SQLite): a job as one row. A run of a job keeps its one task's
-- state in its own row (run and task written once at start, updated once per claim and once
-- per result) instead of a row in step_tasks beside it. Flows keep one row per task.
--
-- These columns are NULL for the runs of flows. On a job's run, step_slug names its one step
-- and task_status is its task's status (queued | started | completed | failed | cancelled),
-- NULL while it has no task (a condition that did not hold). The task's id, as claims and
-- results name it, is -rowid: negative, so it never meets a step_tasks id.
ALTER TABLE runs ADD COLUMN step_slug TEXT;
ALTER TABLE runs ADD COLUMN task_status TEXT;
ALTER TABLE runs ADD COLUMN flow_version INTEGER;
ALTER TABLE runs ADD COLUMN attempts INTEGER;
ALTER TABLE runs ADD COLUMN claims INTEGER;
ALTER TABLE runs ADD COLUMN max_attempts INTEGER;
-- due: when the task is due (a retry's backoff); task_error: its last failed attempt's
-- error; task_started_at: when its current (or last) attempt started.
ALTER TABLE runs ADD COLUMN due REAL;
ALTER TABLE runs ADD COLUMN history TEXT;
ALTER TABLE runs ADD COLUMN task_error TEXT;
ALTER TABLE runs ADD COLUMN lease_owner TEXT;
ALTER TABLE runs ADD COLUMN lease_expires REAL;
ALTER TABLE runs ADD COLUMN task_started_at REAL;

-- What step_tasks' indexes are to the tasks of flows, for the tasks of jobs.
CREATE INDEX runs_queued ON runs (flow_slug, priority DESC, due) WHERE task_status = 'queued';
CREATE INDEX runs_running ON runs (flow_slug, lease_expires) WHERE task_status = 'started';
CREATE INDEX runs_retrying ON runs (flow_slug) WHERE task_status = 'queued' AND attempts > 0;

-- Every task, of flows and of jobs, in step_tasks' columns: what reads and counts go through.
CREATE VIEW tasks AS
SELECT id, run_id, flow_slug, step_slug, flow_version, task_index, status, attempts, claims,
       max_attempts, priority, run_at, input, output, error, history, lease_owner,
       lease_expires, created_at, started_at, finished_at
FROM step_tasks
UNION ALL
SELECT -rowid, id, flow_slug, step_slug, flow_version, NULL, task_status, attempts, claims,
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
