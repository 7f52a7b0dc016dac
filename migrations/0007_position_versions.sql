-- Which transaction last wrote a stream's state: its position, parked events or gaps. A store
-- keeps the positions it wrote last in memory, and plans a batch on them without reading or
-- locking them; the batch's position update then checks, with positions_current, that every
-- one of them still holds the version it wrote, and refuses the batch otherwise.
alter table positions add column version bigint not null default 0;

create function positions_current(updated bigint, expected bigint) returns void
language plpgsql as $$
begin
    if updated <> expected then
        raise exception 'stream positions written by another transaction since this store wrote them (% of %)',
            expected - updated, expected
            using errcode = 'serialization_failure',
                  hint = 'the batch is planned again from positions read under their locks';
    end if;
end
$$;
