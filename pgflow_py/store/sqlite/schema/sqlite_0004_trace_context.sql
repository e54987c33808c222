-- pgflow_py schema version 4 (SQLite): the W3C trace context (JSON text, e.g. {"traceparent":
-- "00-…"}) of the code that started a run, so its attempts' spans join that trace. NULL when
-- OpenTelemetry was not in use (or no span was current) at the start, and for cron runs.
ALTER TABLE runs ADD COLUMN trace_context TEXT;
