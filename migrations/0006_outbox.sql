-- Business events to publish (see docs/correlation.md sections 5, 7 and 8): written in the batch
-- transaction, published at least once by runner/outbox.py with the stable id event_id. A
-- rebuild's business events are 'held' under '<name>#rebuild' until its swap.
create table outbox (
    seq          bigserial   primary key,    -- publish order
    projection   text        not null,
    event_id     text        not null,       -- the business event's stable id
    topic        text        not null,
    msg_key      text        not null,       -- stream (default) or event_id
    event        jsonb       not null,       -- Event.to_json()
    event_ts     bigint      not null,
    status       text        not null default 'pending',  -- pending | held | published
    attempts     int         not null default 0,
    created_at   timestamptz not null default now(),
    published_at timestamptz,
    unique (projection, event_id)
);
create index outbox_pending on outbox (projection, seq) where status = 'pending';
