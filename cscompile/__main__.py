"""``python -m cscompile`` is the ``cscompile`` command."""

import sys

from cscompile.compiler.cli import main

sys.exit(main())
