"""How the command line talks: one `ofacls: ...` line on stderr per problem,
exit codes, signals, and stdout writes that turn a full or closed stdout into
one line instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer

from ofacls.errors import HubError, InputError, ModelError, OfaclsError, OutputError, debug

if TYPE_CHECKING:
    from ofacls.prediction import Prediction

EXIT_FAILED, EXIT_USAGE, EXIT_MODEL, EXIT_INTERRUPTED = 1, 2, 3, 130


class _OneLineHandler(logging.Handler):
    """The library's notices (`logging.getLogger("ofacls")`) as our own stderr lines."""

    def emit(self, record: logging.LogRecord) -> None:
        err(record.getMessage())


def log_to_stderr() -> None:
    log = logging.getLogger("ofacls")
    if not any(isinstance(h, _OneLineHandler) for h in log.handlers):
        log.addHandler(_OneLineHandler(logging.INFO))


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, taken as an interruption like Ctrl-C (SIGINT)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


TOLD_AT_MOST = 25  # failed inputs named one by one on stderr; past that, a count and where


# this run's rows so far and how many it has to write (None: a stream), for the
# interrupt line: the command is a process of its own, so one run per process
_RUN: dict[str, int | None] = {"rows": 0, "total": None}


class FailureTeller:
    """Names each failed input on stderr as its row comes out (above a progress bar:
    rich's live display moves stderr's lines above itself), once, and after
    TOLD_AT_MOST of them says where the others are instead of flooding the terminal.
    `told` holds inputs already named (at expansion, before the model loaded).
    Counts the rows against `total` for the interrupt line."""

    def __init__(self, rest_are: str, told: set[str] | None = None, total: int | None = None) -> None:
        self.rest_are, self.told, self.named = rest_are, told or set(), 0
        _RUN.update(rows=0, total=total)

    def __call__(self, pred: Prediction) -> None:
        _RUN["rows"] = (_RUN["rows"] or 0) + 1
        if pred.ok or pred.input in self.told:
            return
        self.named += 1
        if self.named <= TOLD_AT_MOST:
            err(f"{pred.input}: {pred.error}")
        elif self.named == TOLD_AT_MOST + 1:
            err(f"more inputs failed; {self.rest_are}")


def _how_far() -> str:
    """How far an interrupted run got, as " (37 of 120 done this run)"."""
    of = f" of {_RUN['total']}" if _RUN["total"] is not None else ""
    return f" ({_RUN['rows']}{of} done this run)" if _RUN["rows"] or of else ""


def _raise_signal(signum: int, frame: object) -> None:
    raise _Signalled(signum)


ARGV: list[str] | None = None  # the command line, as main() was started with it


def _how_to_resume(stdin: bool) -> str:
    """How to continue this interrupted batch: the same command, with --resume
    (spelled out when it fits on a line; a glob's expansion would not), given
    the same list again where it came from stdin."""
    import shlex

    from ofacls.sources.fetch import redact

    # credentials typed into a URL stay out of the message, as out of the rows
    args = [redact(a) for a in (ARGV or ["batch", "..."]) if a != "--overwrite"]
    command = shlex.join(["ofacls", *args, *([] if "--resume" in args else ["--resume"])])
    again = " with the same inputs on stdin" if stdin else ""
    return f"continue with `{command}`{again}" if len(command) <= 500 else \
        f"continue with the same command plus --resume{again}"


def model_hint(model_id: str) -> str:
    """A missing model's way out, for a command that takes the model options."""
    from ofacls.hub import ELSEWHERE, needs_once

    return (f"{needs_once(model_id)}: pass --model DIR for a local copy, or run `ofacls download "
            f"{model_id} --cache-dir DIR` where the hub is reachable and use --cache-dir DIR "
            f"--offline here; {ELSEWHERE}")


def download_hint(model_id: str) -> str:
    """A missing model's way out, for `ofacls download` itself."""
    from ofacls.hub import ELSEWHERE, needs_once

    return (f"{needs_once(model_id)}: run `ofacls download {model_id} --cache-dir DIR` where the "
            f"hub is reachable and copy DIR here (then --cache-dir DIR --offline); {ELSEWHERE}")


@contextmanager
def one_line_errors(resumable: bool = False, stdin: bool = False,
                    hub_hint: Callable[[str], str] = model_hint) -> Iterator[None]:
    """Map ofacls' errors to one stderr line and an exit code (OFACLS_DEBUG=1: traceback).

    SIGTERM and SIGHUP stop the work as Ctrl-C does: the rows written are complete,
    one line says so (with the command that resumes, when `resumable`: OUT is a
    file --resume can finish; `stdin`: its inputs came on stdin), and the exit
    code is 128 + the signal's number (130 for Ctrl-C)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None:
                signal.signal(signum, _raise_signal)
    try:
        yield
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, _Signalled) else signal.SIGINT
        how = "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"
        err(f"{how}; every row written is complete: {_how_to_resume(stdin)}{_how_far()}"
             if resumable else how)
        try:
            sys.stdout.flush()
        except OSError:
            pass  # a closed pipe: nothing more can reach it anyway
        # Not typer.Exit: the interpreter would then join the loader threads, and a
        # download in flight holds it for up to --timeout. Every row is already
        # written and OUT closed (batch closes it on the way out), so skip the wait.
        os._exit(128 + signum)
    except BrokenPipeError:
        # `ofacls predict ... | head`: the reader has all it wants. Click would
        # exit 1 ("an input failed"); stop quietly instead, as main() intends.
        quiet_stdout()
        raise typer.Exit(0) from None
    except OfaclsError as e:
        if debug():
            import traceback

            traceback.print_exc()
        err(e.message)
        # a hub error's hint in this command's own options, not the library's words
        hint = hub_hint(e.needs) if isinstance(e, HubError) and e.needs else e.hint
        if hint:
            err(f"hint: {hint}")
        code = EXIT_MODEL if isinstance(e, ModelError) else (
            EXIT_FAILED if isinstance(e, InputError) else EXIT_USAGE)
        raise typer.Exit(code) from None


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def quiet_decoders() -> None:
    """Keep PIL's own warnings and log lines off stderr.

    A bad image already gets its one-line reason in its row; PIL's two-line
    UserWarnings (palette transparency, corrupt TIFF tags) and its logged
    errors would break "one line per failure" on stderr. Neither imports PIL.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="PIL")
    pil = logging.getLogger("PIL")
    pil.propagate = False
    if not pil.handlers:  # with none, logging would fall back to printing to stderr
        pil.addHandler(logging.NullHandler())


def err(message: str) -> None:
    """One line on stderr, its control characters escaped (names come from outside)."""
    from ofacls.render import escape

    try:
        print(f"ofacls: {escape(' '.join(message.split()))}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # a full or closed stderr: the work's outcome, and its exit code, stand



def write_stdout(text: str) -> None:
    """Write to stdout now. A stdout that cannot take it (disk full, a closed
    descriptor) ends the run with one line; a closed pipe stops it quietly."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:  # ValueError: the stream was closed
        raise stdout_failed(e) from None


def stdout_failed(e: OSError | ValueError) -> OutputError:
    """The one-line error for a failed stdout write, with stdout pointed at
    /dev/null first: what is still buffered would fail again at exit."""
    quiet_stdout()
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return OutputError(f"cannot write to stdout: {reason[:1].lower()}{reason[1:]}")
