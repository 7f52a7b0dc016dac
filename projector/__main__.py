"""``python -m projector`` is the ``projector`` command."""

from projector.cli import main

main()
