"""projector: read models in PostgreSQL or Redis from Kafka event streams, kept right under
reordering, duplicates, late and missing events.

The data path, one package each: ``source`` (Kafka) → ``core.decode`` → ``core.sequencer`` →
``apply`` (handlers) → ``store`` (one transaction per batch). ``runner`` ties them together.
"""

from projector.core.event import Event, SourceRef

__version__ = "0.1.0"

__all__ = ["Event", "SourceRef", "__version__"]
