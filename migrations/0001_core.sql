-- projector's own state. Applied by `projector migrate` with search_path set to the configured
-- schema (default "projector"); names here are unqualified for that reason.

-- Per (projection, topic, partition): the next offset to read, as in Kafka, and the epoch of the
-- instance that owns the partition. Every batch compares-and-sets on (epoch) so an instance that
-- lost its partitions can never write; next_offset only ever grows.
create table checkpoints (
    projection  text        not null,
    topic       text        not null,
    partition   int         not null,
    next_offset bigint,
    epoch       bigint      not null default 0,
    owner       text,
    updated_at  timestamptz not null default now(),
    primary key (projection, topic, partition)
);

-- Per stream: the last applied seq (and its id and payload hash, to tell a duplicate from a
-- conflict), and the seq of a dead letter that halts the stream.
create table positions (
    projection  text        not null,
    stream      text        not null,
    last_seq    bigint      not null,
    last_id     text,
    last_hash   text,
    blocked_seq bigint,
    updated_at  timestamptz not null default now(),
    primary key (projection, stream)
);

-- Events that arrived ahead of a gap, durable so the consumer can move past them.
create table holding (
    projection text        not null,
    stream     text        not null,
    seq        bigint      not null,
    event      jsonb       not null,
    parked_at  timestamptz not null default now(),
    primary key (projection, stream, seq)
);

-- One row per contiguous missing range of a stream.
create table gaps (
    projection      text        not null,
    stream          text        not null,
    from_seq        bigint      not null,
    to_seq          bigint      not null,
    first_seen      timestamptz not null,
    attempts        int         not null default 0,
    last_request_at timestamptz,
    next_request_at timestamptz,
    state           text        not null default 'open',
    primary key (projection, stream, from_seq)
);
create index gaps_next_request on gaps (projection, next_request_at);

-- Everything that could not be applied, with where it came from and why.
create table dead_letters (
    id          bigserial   primary key,
    projection  text        not null,
    kind        text        not null,
    reason      text        not null,
    stream      text,
    seq         bigint,
    event_id    text,
    event       jsonb,
    topic       text,
    partition   int,
    "offset"    bigint,
    key         bytea,
    value       bytea,
    status      text        not null default 'open',
    attempts    int         not null default 1,
    created_at  timestamptz not null default now(),
    resolved_at timestamptz
);
create index dead_letters_open on dead_letters (projection, status, id);
create index dead_letters_stream on dead_letters (projection, stream) where stream is not null;

-- Which handler migrations (view DDL) have been applied, per projection.
create table view_migrations (
    projection text        not null,
    handler    text        not null,
    version    int         not null,
    applied_at timestamptz not null default now(),
    primary key (projection, handler)
);
