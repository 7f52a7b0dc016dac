-- Where a projection's history starts in each partition: the first offset it ever read. A
-- rebuild refuses to start when the topic no longer holds it (retention moved past it). Null on
-- rows older than this migration: taken as 0.
alter table checkpoints add column start_offset bigint;

-- A rebuild in progress: the shadow schema its views are built in. Its projector state lives
-- under the projection name "<name>#rebuild" in the other tables until the swap.
create table rebuilds (
    projection    text        primary key,
    shadow_schema text        not null,
    started_at    timestamptz not null default now()
);
