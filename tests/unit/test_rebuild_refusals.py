"""What ``projector rebuild`` refuses before it touches anything."""

from __future__ import annotations

import pytest

from projector.config import load_config
from projector.runner.rebuild import Rebuilder
from tests.unit.test_config import EXAMPLE


def test_a_projection_with_a_correlation_is_not_rebuilt_yet() -> None:
    """Proves the refusal comes first, with its reason: the swap does not move pending
    correlations yet, so a rebuilt correlated projection would name other business events.
    No store is opened (the example's servers need not be up)."""
    config = load_config(EXAMPLE, env={})
    with pytest.raises(ValueError, match="has a correlation: rebuilding one is not supported"):
        Rebuilder(config, "school")
