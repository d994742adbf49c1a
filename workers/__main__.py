"""``python -m workers`` is ``sluice-worker``."""

import sys

from workers.cli import main

sys.exit(main())
