"""The README's first command, ``make demo``, end to end against the test services.

The demo publishes the seed scenarios shuffled and partly duplicated (one game's POINT before its
ASSIST) with a few accounts events withheld (only the write side's event store has them), and the
seed's CDC question as Debezium change events of three tables on three topics (shuffled, stale
re-deliveries, tombstones, one unenrolment before its enrolment) with the transaction topic for
the merge projection ``school`` and its correlation (one business event per transaction), and projects the games' plays a second time into Redis (``games_redis``,
``handlers.game_redis``); it runs the real ``projector`` CLI with the reference replay responder,
and compares every row of every view, and every key of the Redis views, with the oracles, exiting
non-zero if one differs. So its exit code and its
verdict lines prove that the first thing a newcomer runs works and reports the truth; running it
twice proves it starts from scratch each time, as the README promises.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest
import redis
from confluent_kafka.admin import AdminClient
from psycopg import sql

from projector.demo import settings_from
from tests.conftest import ROOT, Services, unique

pytestmark = pytest.mark.integration

VIEWS = (
    "accounts.accounts",
    "customers.customers",
    "games.games",
    "games.player_stats",
    "school.enrolment_view",
    "school.student_courses",
    "school.enrolment_history",
    "games_redis:game:<id>",
    "games_redis:game:<id>:player:<n>",
    "games_redis:game:<id>:players",
    "games_redis:game:<id>:leaderboard",
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WITHHELD_ROW = re.compile(r"^│ (account:\d+) +│ (\d+) +│ (?:DEPOSITED|WITHDRAWN) +│", re.M)


def demo_command() -> list[str]:
    """``make demo``, with ``-o`` so make never re-installs the virtualenv mid-test; the module
    itself where make would start local services next to your own, or there is no make."""
    if os.environ.get("PROJECTOR_TEST_KAFKA") or shutil.which("make") is None:
        return [sys.executable, "-m", "projector.demo"]
    return ["make", "--no-print-directory", "-o", ".venv/.installed", "demo"]


@pytest.fixture
def demo_env(services: Services) -> Iterator[dict[str, str]]:
    """The demo's settings, pointed at the test services with its own database, topics and
    Redis keys, so a user's demo is left alone; all are removed afterwards."""
    env = {
        **os.environ,
        "PROJECTOR_DEMO_KAFKA": services.kafka,
        "PROJECTOR_DEMO_PG_DSN": services.pg_dsn,
        "PROJECTOR_DEMO_REDIS_URL": services.redis_url,
        "PROJECTOR_DEMO_DB": unique("demo"),
        "PROJECTOR_DEMO_PREFIX": unique("demo"),
    }
    yield env
    settings = settings_from(env)
    with psycopg.connect(services.pg_dsn, autocommit=True) as admin:
        drop = sql.SQL("drop database if exists {} with (force)")
        admin.execute(drop.format(sql.Identifier(settings.database)))
    kafka = AdminClient({"bootstrap.servers": services.kafka})
    topics = [t for t in kafka.list_topics(timeout=10).topics if t.startswith(settings.topic(""))]
    if topics:
        for future in kafka.delete_topics(topics, operation_timeout=30).values():
            future.result(timeout=30)
    settings.config_path.unlink(missing_ok=True)
    with redis.Redis.from_url(services.redis_url) as client:
        keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


def run_demo(env: dict[str, str]) -> str:
    done = subprocess.run(
        demo_command(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    output = ANSI.sub("", done.stdout + done.stderr)
    assert done.returncode == 0, output
    return output


def test_make_demo_ends_with_every_view_equal_to_its_oracle_and_runs_again(
    demo_env: dict[str, str],
) -> None:
    """Proves ``make demo`` exits 0 and says each of the seven views (the school's business
    events among them), the four key patterns of
    the games in Redis, the seed's game whose POINT came before its ASSIST, that game's top 3
    in Redis, and the school student whose unenrolment came before the enrolment, equals its
    oracle, with nothing parked, missing or dead-lettered (in PostgreSQL and in Redis) and
    every partition read, after the withheld events' gaps opened and were filled through
    replay; and that a second run over the first one's database, topics and Redis keys (which
    it deletes first) does too."""
    prefix = re.escape(settings_from(demo_env).redis_prefix)
    for run in range(2):
        output = run_demo(demo_env)
        for view in VIEWS:
            assert f"✓ {view} equals its oracle" in output, output
        assert re.search(r"✓ equal to the oracle: game \w+'s score", output), output
        assert re.search(r"✓ equal to the oracle: game \w+'s top 3 by points", output), output
        assert_unenrolment_before_enrolment(output)
        for state in ("parked events", "gaps", "dead letters"):
            assert re.search(rf"✓ {state} \(projector\.\w+\): 0\n", output), output
            in_redis = rf"✓ {state} \({prefix}:s:games_redis:[\w:<>]+\): 0\n"
            assert re.search(in_redis, output), output
        assert "✓ correlations still open (projector.correlations): 0\n" in output, output
        published = r"✓ \S+-school\.business, de-duplicated by id, equals its oracle"
        assert re.search(published.replace(" ", r"\s+"), output), output
        assert re.search(r"✓ partitions read to their end: (\d+) of \1\n", output), output
        deleted = re.search(rf"keys {prefix}:\*\s+\((\d+) deleted\)", output)
        assert deleted, output
        assert (int(deleted[1]) > 0) == (run > 0), output  # the first run's keys, not a fresh run's
        assert_gaps_filled_through_replay(output)


def assert_gaps_filled_through_replay(output: str) -> None:
    """The withheld events' story: each one's gap is listed open and asked for, the daemon
    requests replays, the responder re-publishes each event, and the gaps fill."""
    withheld = WITHHELD_ROW.findall(output)
    assert len(withheld) == 3, output
    assert f"Withheld: {len(withheld)} accounts events never reach" in output, output
    assert f"│ {len(withheld)} gap(s)\n" in output, output  # projector gaps list, mid-run
    for stream, seq in withheld:
        listed = rf"│ accounts {stream} {seq}-{seq} open: age \d+s, [1-9]\d* attempt\(s\)"
        assert re.search(listed, output), output
        assert f"responder accounts: replayed 1 event(s) of {stream}\n" in output, output
    assert re.search(r"accounts  projection accounts: requested replay of \d+ gap", output), output
    assert re.search(r"projector replay-responder: exit code 0\b", output), output
    filled = f"✓ accounts: the {len(withheld)} gaps were filled through replay: 0 open, 0 events"
    assert filled in output, output


def assert_unenrolment_before_enrolment(output: str) -> None:
    """The CDC highlight: an enrolment row's delete and tombstone published before its create,
    and the student's enrolments, none in that course, equal to the oracle (words, not line
    breaks: the output wraps at the terminal's width)."""
    published = r"^    unenrolment  →  tombstone  →  \d+ other messages  →  enrolment$"
    assert re.search(published, output, re.M), output
    verdict = (
        r"✓ equal to the oracle: student (\d+)'s [1-9]\d* enrolments?, none in [^(]+ \(course"
        r" (\d+)\), and no row \((\d+), (\d+)\) in school\.enrolments"
    )
    match = re.search(verdict.replace(" ", r"\s+"), output)
    assert match, output
    assert (match[1], match[2]) == (match[3], match[4]), output
