"""The ofacls command line: parse, call the core, print.

Only this package knows about Typer, exit codes and terminals. It imports
nothing heavy at module level (torch, PIL and modelscope load inside the
commands), so `ofacls --help` and shell completion answer instantly.
"""

from ofacls.cli import classify, evaluating, models, serving  # noqa: F401  (they register)
from ofacls.cli.app import app, main

__all__ = ["app", "main"]
