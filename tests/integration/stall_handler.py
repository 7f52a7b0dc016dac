"""A handler for the fault suite: the accounts view, except that while the file named by
``PROJECTOR_TEST_STALL_FILE`` (in the daemon's environment) exists, a batch stalls inside the
handler, in its open store transaction, as a handler stuck on a slow dependency would; it goes
on when the file is removed. Cross-process: the test, in another process, creates the file to
inject the stall and removes it to end it. Unset, the handler is ``handlers.accounts``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

from handlers import accounts
from projector.apply import PgView
from projector.core.event import Event

MIGRATIONS = accounts.MIGRATIONS
STALL_FILE = os.environ.get("PROJECTOR_TEST_STALL_FILE")
LIMIT = 300.0  # a test that forgets to remove the file does not leave a daemon stuck for ever

log = logging.getLogger(__name__)


def handle(events: Sequence[Event], view: PgView) -> None:
    if STALL_FILE and os.path.exists(STALL_FILE):
        log.warning("stall_handler: stalled in a batch of %d events", len(events))
        started = time.monotonic()
        while os.path.exists(STALL_FILE) and time.monotonic() - started < LIMIT:
            time.sleep(0.05)  # the injected stall itself
        log.warning("stall_handler: woke after %.1fs", time.monotonic() - started)
    accounts.handle(events, view)
