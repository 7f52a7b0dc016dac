"""A gap's replay schedule on PostgreSQL, when another instance's gap timer moves it while a
batch that rewrites the stream's gaps is under way (the timer takes no position lock): the
batch keeps what the timer wrote, for the gaps that stay and for those carved out of one."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from projector.core.gaps import Gap
from projector.core.sequencer import SequenceRules
from tests.conftest import Services
from tests.integration.test_parked_seqs import accounts_on_partition_0, wire

pytestmark = pytest.mark.integration

ASKED = 4_000_000_000.0  # when the other instance's gap timer asked (epoch s)


def test_gaps_carved_out_of_one_the_gap_timer_moved_meanwhile_take_its_schedule(
    services: Services, pg_dsn: str
) -> None:
    """Proves a batch planned on a gap's schedule as it read it (attempt 0, due) writes the
    pieces carved out of it with the schedule the other instance's gap timer set since
    (attempt 3, held, next request later), and removes the gap they came from: written back
    as read, the pieces fell due at once and were asked for again."""
    store, applier, decoders, epochs = accounts_on_partition_0(services, pg_dsn)
    stream = "account:0"
    try:
        applier.apply([wire(stream, 1, 0), wire(stream, 6, 1)], decoders, epochs)  # gap 2-5
        with store.batch("accounts", "accounts") as tx:
            tx.lock_positions([stream], SequenceRules())
            [read] = tx.load_gaps([stream])[stream]
            assert (read.from_seq, read.to_seq, read.attempts) == (2, 5, 0)
            with psycopg.connect(pg_dsn, autocommit=True) as timer:
                timer.execute(
                    "update projector.gaps set attempts = 3, last_request_at = %s,"
                    " next_request_at = %s, state = 'held' where stream = %s and from_seq = 2",
                    (
                        datetime.fromtimestamp(ASKED, UTC),
                        datetime.fromtimestamp(ASKED + 60, UTC),
                        stream,
                    ),
                )
            # 2 arrived and 4 was parked: the sequencer's pieces, with the schedule it read.
            pieces = [
                Gap(stream, lo, lo, read.first_seen, read.attempts, None, read.next_request_at)
                for lo in (3, 5)
            ]
            tx.replace_gaps([stream], pieces)
        rows = store.conn.execute(
            "select from_seq, to_seq, attempts, extract(epoch from next_request_at), state"
            " from projector.gaps where stream = %s order by from_seq",
            (stream,),
        ).fetchall()
        store.conn.rollback()
        assert [(f, t, a, float(n), s) for f, t, a, n, s in rows] == [
            (3, 3, 3, ASKED + 60, "held"),
            (5, 5, 3, ASKED + 60, "held"),
        ]
    finally:
        store.close()
