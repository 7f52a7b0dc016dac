-- Correlations (see docs/correlation.md): one record per correlation key, the core's Pending
-- as JSON; due = the event time (ms) at which it needs attention with no new part (its
-- deadline, or when its oldest closed window is forgotten); null: never.
create table correlations (
    projection text        not null,
    key        text        not null,
    due        bigint,
    record     jsonb,                       -- null only inside a batch: a row being created
    updated_at timestamptz not null default now(),
    primary key (projection, key)
);
create index correlations_due on correlations (projection, due) where due is not null;

-- Each input partition's event-time progress (core InputTime), written by its owner in the
-- batch transaction; every instance reads all of a projection's rows for the watermark.
alter table checkpoints
    add column event_time_high bigint,
    add column caught_up       boolean not null default false;
