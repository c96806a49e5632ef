"""`ofacls download` and `ofacls labels`: the model cache and the label list."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ofacls.cli.app import app
from ofacls.cli.feedback import one_line_errors, write_stdout
from ofacls.cli.options import CacheDirOpt, ModelOpt, OfflineOpt, QuietOpt
from ofacls.hub import DEFAULT_MODEL_ID


@app.command()
def download(
    model_id: Annotated[str, typer.Argument(help="ModelScope model id.")] = DEFAULT_MODEL_ID,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Model revision.")] = None,
    cache_dir: CacheDirOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fetch a model into the local cache (unless it is complete there) and print its folder.

    Examples:

      ofacls download

      ofacls download --cache-dir /data/models && ofacls predict --cache-dir /data/models --offline x.jpg
    """
    from ofacls.errors import CheckpointError
    from ofacls.hub import resolve_model
    from ofacls.model.folder import ModelFolder

    with one_line_errors():
        folder = ModelFolder.open(resolve_model(model_id, revision=revision, cache_dir=cache_dir,
                                                progress=not quiet and sys.stderr.isatty()))
        lacks = folder.lacks()
        if lacks:  # a local folder given by mistake: nothing to fetch, nothing usable
            raise CheckpointError(f"{folder.path} is not a complete model folder: {lacks}")
        write_stdout(f"{folder.path}\n")


@app.command()
def labels(model: ModelOpt = DEFAULT_MODEL_ID, offline: OfflineOpt = False,
           cache_dir: CacheDirOpt = None) -> None:
    """Print the model's labels, one per line, in class-index order (line N is index N-1).

    Examples:

      ofacls labels | grep -i terrier

      ofacls labels | sed -n 282p      # class index 281
    """
    from ofacls.hub import resolve_model
    from ofacls.model.folder import ModelFolder

    with one_line_errors():
        names = ModelFolder.open(resolve_model(model, offline=offline, cache_dir=cache_dir)
                                 ).label_names()
        write_stdout("".join(f"{n}\n" for n in names))  # inside _errors: a closed pipe stops quietly
