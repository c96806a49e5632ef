"""The `ofacls` Typer application and its entry point, `main`."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from ofacls import __version__
from ofacls.cli import feedback
from ofacls.cli.feedback import EXIT_INTERRUPTED, err, log_to_stderr

EXIT_CODES = ("Exit codes: 0 every input classified; 1 at least one input failed (all rows "
              "still written); 2 bad usage, or the output cannot be written; 3 the model could "
              "not be found, downloaded or loaded; 130 interrupted (Ctrl-C), 143 SIGTERM, "
              "129 SIGHUP.")


class _OneLineErrors(TyperGroup):
    """Click's usage errors as one `ofacls: ...` line on stderr, like all of ours.

    Click prints usage, a hint and the error over four lines; scripts that read
    stderr get one line per problem instead. `ofacls` alone still shows the help."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.Abort:
            err("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:
            # by class name: Typer >= 0.22 raises its own vendored copies of click's classes
            kinds = {c.__name__ for c in type(e).__mro__}
            if "ClickException" not in kinds:
                raise
            if "NoArgsIsHelpError" in kinds:
                e.show()  # type: ignore[attr-defined]
                sys.exit(e.exit_code)  # type: ignore[attr-defined]
            ctx = getattr(e, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if "UsageError" in kinds and ctx else ""
            # Typer's pydantic-based checks say "Value error, 'x' is not one of ..."
            message = e.format_message().replace("Value error, ", "")  # type: ignore[attr-defined]
            err(f"{message}{where}")
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        sys.exit(code if isinstance(code, int) else 0)


    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Each command's first sentence whole, wrapped: click cuts it to the
        terminal's width mid-phrase ("Classify images and print their top-k labels: a line (or...")."""
        rows = [(name, cmd.get_short_help_str(limit=1000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class InputsCommand(TyperCommand):
    """A command whose help reads as a shell user writes it: `INPUT...`, not Typer's
    `{INPUT}...` and `INPUT <list[str]>`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [p.replace("{", "").replace("}", "") for p in super().collect_usage_pieces(ctx)]

    def get_help(self, ctx: Any) -> str:
        text = super().get_help(ctx)
        for typename in (" <list[str]>", " <str>"):
            text = text.replace(typename, " " * len(typename))
        return text


app = typer.Typer(
    name="ofacls",
    cls=_OneLineErrors,
    help="Classify images into the 1000 ImageNet classes with OFA.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ofacls {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False
          ) -> None:
    """Classify images into the 1000 ImageNet classes with OFA."""
    log_to_stderr()


def main() -> None:
    from ofacls.libc import share_one_malloc_arena

    feedback.ARGV = sys.argv[1:]  # for the --resume command an interruption prints
    share_one_malloc_arena()  # before any thread allocates, or glibc ignores it
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:  # started with the descriptor closed (`>&-`)
            setattr(sys, name, open(os.devnull, "w"))
    # a file name that is not valid UTF-8 reaches stdout as the bytes it was made of
    # (os.fsdecode's surrogates), never as an encoding error that drops every line
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        app()
    except BrokenPipeError:  # `ofacls ... | head`: stop quietly
        sys.stderr.close()
        os._exit(0)
    except SystemExit as done:  # click ends every command this way, successful ones too
        if "torch" in sys.modules and isinstance(done.code, (int, type(None))):
            _exit_without_teardown(done.code or 0)
        raise


def _exit_without_teardown(code: int) -> NoReturn:
    """Exit at once, skipping the interpreter's teardown.

    Once torch is loaded, finalising its modules takes 0.6-1 s of CPU after the
    last row is out, and scripts that run ofacls once per image pay it every
    time. Nothing is left to finish by then: rows are written and files closed
    (the commands close them on the way out); only the std streams' buffers remain."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe or stream: nothing can reach it any more
    os._exit(code)
