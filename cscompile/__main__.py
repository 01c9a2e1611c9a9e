"""``python -m cscompile`` is the ``cscompile`` command."""

import sys

from cscompile.cli.main import main

sys.exit(main())
