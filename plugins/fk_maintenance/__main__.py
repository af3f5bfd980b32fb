"""``python -m fk_maintenance``: the ``fk-maintenance`` command (see fk_maintenance.cli)."""

import sys

from .cli import main

sys.exit(main())
