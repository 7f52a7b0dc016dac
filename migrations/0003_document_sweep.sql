-- Merge mode: when a document's tombstones were last swept (see merge.tombstone_retention),
-- so an unchanged document is swept once, not at every sweep.
alter table documents add column swept_at timestamptz;
