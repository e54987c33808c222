-- pgflow_py schema version 5 (PostgreSQL): conditional steps (pgflow 0.14), as SQLite's schema
-- version 6: a step state may be 'skipped', and skip_reason says why (condition_unmet,
-- handler_failed, dependency_skipped). (Version 4 is the throughput migration, from another
-- branch.)

ALTER TABLE step_states ADD COLUMN skip_reason TEXT;
