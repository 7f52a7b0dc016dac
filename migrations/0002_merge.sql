-- Merge mode: per document (stream), its merge state: every field's newest (ts, id) stamp and
-- value, and the tombstones of deleted fields and documents, so the merge stays right across
-- restarts and instances, whatever the arrival order.
create table documents (
    projection text        not null,
    stream     text        not null,
    state      jsonb       not null,
    updated_at timestamptz not null default now(),
    primary key (projection, stream)
);
