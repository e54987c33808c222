-- pgflow_py schema version 2 (PostgreSQL): what store.count(), stats() and workers() read
-- (as SQLite's schema version 3).

CREATE INDEX runs_failed ON runs (flow_slug) WHERE status = 'failed';
CREATE INDEX runs_cancelled ON runs (flow_slug) WHERE status = 'cancelled';

ALTER TABLE workers ADD COLUMN lease_seconds DOUBLE PRECISION;
