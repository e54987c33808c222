-- pgflow_py schema version 4 (PostgreSQL): tasks completed and attempts failed per flow and
-- minute (as SQLite's schema version 5).

CREATE TABLE throughput (
    flow_slug TEXT NOT NULL,
    minute INTEGER NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (flow_slug, minute)
);
