-- pgflow_py schema version 6 (SQLite): conditional steps (pgflow 0.14). A step state may now be
-- 'skipped', and says why: condition_unmet (its if_/if_not did not hold), handler_failed (its
-- last attempt failed, when_exhausted skips) or dependency_skipped (a skip-cascade upstream).
-- (Version 5 is the throughput migration, from another branch.)
ALTER TABLE step_states ADD COLUMN skip_reason TEXT;
