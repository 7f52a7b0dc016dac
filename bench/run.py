"""The benchmark's one command: ``python -m bench.run`` (or ``python bench/run.py``).
``--help`` lists the options; bench/README.md says what each figure means."""

import sys
from pathlib import Path

if not __package__:  # run as a script: import the repository's packages, not bench/'s modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
