"""The ``cscompile`` command line: one module per subcommand, registered in one explicit list.

Every command is a thin layer over the Python API. A :class:`~cscompile.errors.UserError`
prints one line (``error: <subject> | <received>. Expected <what>.``) and exits 2 without a
traceback; anything else is an internal error and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
import threading

import click

from cscompile import __version__
from cscompile.cli.commands import (
    build,
    bundle_cmds,
    calibrate,
    classify,
    evaluate,
    generate,
    inspect,
    model,
    quantize,
    serve,
)
from cscompile.errors import UserError

#: Exit codes CI can rely on.
EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cscompile")
def cli() -> None:
    """cscompile: compile decoder LLMs into fast, reduced bundles for your own hardware."""


COMMANDS = [
    model.model,
    inspect.inspect_cmd,
    quantize.quantize_cmd,
    calibrate.calibrate_cmd,
    generate.run,
    classify.classify_cmd,
    evaluate.eval_cmd,
    build.build_cmd,
    bundle_cmds.verify_cmd,
    bundle_cmds.bench_cmd,
    serve.serve_cmd,
]
for _cmd in COMMANDS:
    cli.add_command(_cmd)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM ends the command like Ctrl-C: ``finally`` blocks remove its scratch files."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="cscompile", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_USER
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code if exc.exit_code else EXIT_USER
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
