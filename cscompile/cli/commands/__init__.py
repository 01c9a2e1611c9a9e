"""One module per ``cscompile`` subcommand; the list that registers them is in ``cli.py``."""
