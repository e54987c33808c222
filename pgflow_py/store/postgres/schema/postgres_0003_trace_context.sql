-- pgflow_py schema version 3 (PostgreSQL): the W3C trace context of the code that started a
-- run (as SQLite's schema version 4).

ALTER TABLE runs ADD COLUMN trace_context TEXT;
