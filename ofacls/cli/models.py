"""`ofacls download` and `ofacls labels`: the model cache and the label list."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ofacls.cli.app import InputsCommand, app
from ofacls.cli.feedback import download_hint, one_line_errors, write_stdout
from ofacls.cli.options import CacheDirOpt, ModelOpt, OfflineOpt, QuietOpt
from ofacls.errors import UsageError
from ofacls.hub import DEFAULT_MODEL_ID


@app.command(cls=InputsCommand)
def download(
    model_id: Annotated[Optional[str], typer.Argument(
        metavar="ID", show_default=False, help="ModelScope model id (or give it as --model).")] = None,
    model: ModelOpt = DEFAULT_MODEL_ID,
    revision: Annotated[Optional[str], typer.Option("--revision", metavar="REV",
                                                    help="Model revision (a tag or commit).")] = None,
    cache_dir: CacheDirOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fetch a model into the local cache (unless it is complete there) and print its folder.

    Examples:

      ofacls download

      ofacls download -m iic/ofa_image-classification_imagenet_large_en

      ofacls download --cache-dir /data/models     # for later --offline runs
    """
    from ofacls.errors import CheckpointError
    from ofacls.hub import resolve_model
    from ofacls.model.folder import ModelFolder

    with one_line_errors(hub_hint=download_hint):
        if model_id is not None and model != DEFAULT_MODEL_ID and model != model_id:
            raise UsageError(f"two models named: {model_id} and --model {model}; give one")
        folder = ModelFolder.open(resolve_model(model_id or model, revision=revision, cache_dir=cache_dir,
                                                progress=not quiet and sys.stderr.isatty()))
        lacks = folder.lacks()
        if lacks:  # a local folder given by mistake: nothing to fetch, nothing usable
            raise CheckpointError(f"{folder.path} is not a complete model folder: {lacks}")
        write_stdout(f"{folder.path}\n")


@app.command()
def labels(model: ModelOpt = DEFAULT_MODEL_ID, offline: OfflineOpt = False,
           cache_dir: CacheDirOpt = None,
           # taken, and hidden, so one set of model options serves every command in a script;
           # the labels are the same on every device and precision
           device: Annotated[str, typer.Option("--device", hidden=True)] = "auto",
           precision: Annotated[str, typer.Option("--precision", hidden=True)] = "auto") -> None:
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


@app.command()
def info(model: ModelOpt = DEFAULT_MODEL_ID, offline: OfflineOpt = False,
         cache_dir: CacheDirOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Show what a model folder is: where it is, its network, image size and mean/std,
    gen_type and beam settings, its labels and where their class indices come from,
    its tokenizer and weight files.

    Examples:

      ofacls info

      ofacls info --model ./my-finetune --json | jq .labels
    """
    from ofacls.hub import resolve_model
    from ofacls.model.describe import describe
    from ofacls.model.folder import ModelFolder

    with one_line_errors():
        facts = describe(ModelFolder.open(resolve_model(model, offline=offline, cache_dir=cache_dir)),
                         model)
        if as_json:
            import json

            write_stdout(json.dumps(facts, ensure_ascii=False) + "\n")
        else:
            from ofacls.render import info_text

            write_stdout(info_text(facts))
