"""``python -m fk_maintenance``: the ``fk-maintenance`` command (see fk_maintenance.cli.commands)."""

import sys

from fk_maintenance.cli.commands import main

sys.exit(main())
