-- pgflow_py schema version 5 (SQLite): tasks completed and attempts failed per flow and minute
-- (epoch seconds // 60), for store.throughput(). Runners add their tallies at each heartbeat,
-- so completing a task writes nothing here and no index of runs or tasks grows for it.
CREATE TABLE throughput (
    flow_slug TEXT NOT NULL,
    minute INTEGER NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (flow_slug, minute)
) WITHOUT ROWID;
