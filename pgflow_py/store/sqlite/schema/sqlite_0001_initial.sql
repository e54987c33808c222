-- pgflow_py schema version 1 (SQLite). Data model after pgflow: definitions (flows, steps, deps),
-- state (runs, step_states, step_tasks) and workers. Times are seconds since the epoch (REAL).

CREATE TABLE flows (
    flow_slug   TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    definition  TEXT NOT NULL,          -- FlowDefinition as JSON
    version     INTEGER NOT NULL,       -- bumped when the shape (steps, dependencies) changes
    cron_last_tick REAL,                -- the latest cron tick a run was started for
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);

CREATE TABLE steps (
    flow_slug     TEXT NOT NULL,
    step_slug     TEXT NOT NULL,
    step_index    INTEGER NOT NULL,
    step_type     TEXT NOT NULL,
    deps_count    INTEGER NOT NULL,
    max_attempts  INTEGER,
    base_delay    REAL,
    timeout       REAL,
    start_delay   REAL NOT NULL,
    handler       TEXT,                 -- import path module:qualname
    PRIMARY KEY (flow_slug, step_slug)
) WITHOUT ROWID;

CREATE TABLE deps (
    flow_slug  TEXT NOT NULL,
    dep_slug   TEXT NOT NULL,
    step_slug  TEXT NOT NULL,
    PRIMARY KEY (flow_slug, dep_slug, step_slug)
) WITHOUT ROWID;

CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    flow_slug        TEXT NOT NULL,
    status           TEXT NOT NULL,     -- started | completed | failed | cancelled
    input            TEXT NOT NULL,
    output           TEXT,
    error            TEXT,
    key              TEXT,
    priority         INTEGER NOT NULL DEFAULT 0,
    remaining_steps  INTEGER NOT NULL,
    run_at           REAL NOT NULL,     -- when the first task is due
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL
);
-- A key names one live or finished run of a flow; a cancelled run frees its key.
CREATE UNIQUE INDEX runs_flow_key ON runs (flow_slug, key)
    WHERE key IS NOT NULL AND status != 'cancelled';
CREATE INDEX runs_flow ON runs (flow_slug);
CREATE INDEX runs_unfinished ON runs (flow_slug) WHERE status = 'started';
CREATE INDEX runs_finished ON runs (finished_at) WHERE status != 'started';

CREATE TABLE step_states (
    run_id           TEXT NOT NULL,
    step_slug        TEXT NOT NULL,
    status           TEXT NOT NULL,     -- created | started | completed | failed | cancelled
    remaining_deps   INTEGER NOT NULL,
    remaining_tasks  INTEGER,
    output           TEXT,
    error            TEXT,
    started_at       REAL,
    finished_at      REAL,
    PRIMARY KEY (run_id, step_slug)
) WITHOUT ROWID;

CREATE TABLE step_tasks (
    id             INTEGER PRIMARY KEY,
    run_id         TEXT NOT NULL,
    flow_slug      TEXT NOT NULL,
    step_slug      TEXT NOT NULL,
    flow_version   INTEGER NOT NULL,    -- the flow's version when the task was created
    task_index     INTEGER,             -- NULL for a single step, element index for a map
    status         TEXT NOT NULL,       -- queued | started | completed | failed | cancelled
    attempts       INTEGER NOT NULL DEFAULT 0,   -- of the current try; reset by store.retry
    claims         INTEGER NOT NULL DEFAULT 0,   -- every claim ever: a result names its claim
    max_attempts   INTEGER NOT NULL,
    priority       INTEGER NOT NULL DEFAULT 0,
    run_at         REAL NOT NULL,
    input          TEXT,                -- NULL: the run's input
    output         TEXT,
    error          TEXT,
    history        TEXT,                -- JSON list of failed attempts
    lease_owner    TEXT,
    lease_expires  REAL,
    created_at     REAL NOT NULL,
    started_at     REAL,
    finished_at    REAL
);
-- The claim query walks this index in claim order and touches queued rows only.
CREATE INDEX step_tasks_ready ON step_tasks (priority DESC, run_at, id) WHERE status = 'queued';
-- When the next queued task of a flow is due: a cheap read before claiming, and idle waits.
CREATE INDEX step_tasks_due ON step_tasks (flow_slug, run_at) WHERE status = 'queued';
CREATE INDEX step_tasks_run ON step_tasks (run_id, step_slug, task_index);
-- Running tasks per flow (concurrency caps) and their leases (reclaiming expired ones).
CREATE INDEX step_tasks_running ON step_tasks (flow_slug, lease_expires) WHERE status = 'started';

CREATE TABLE workers (
    id              TEXT PRIMARY KEY,
    hostname        TEXT,
    pid             INTEGER,
    flows           TEXT,
    started_at      REAL NOT NULL,
    last_heartbeat  REAL NOT NULL
);
