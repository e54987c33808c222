-- pgflow_py schema version 2 (SQLite): less to write per job.

-- A job's one step keeps its state in its task: no step_states row.
DELETE FROM step_states WHERE run_id IN (
    SELECT r.id FROM runs r JOIN flows f ON f.flow_slug = r.flow_slug WHERE f.kind = 'job'
);

-- One index of queued tasks per flow, in claim order, instead of one across flows (which made
-- a backlog in one queue slow every other queue's claims) plus one by due time.
DROP INDEX step_tasks_ready;
DROP INDEX step_tasks_due;
CREATE INDEX step_tasks_queued ON step_tasks (flow_slug, priority DESC, run_at, id)
    WHERE status = 'queued';

-- Pruning scans the runs instead of every completion updating an index by finish time.
DROP INDEX runs_finished;

-- runs.started_at is now written when a run's first attempt ends; until then it is read from
-- the run's running tasks.
