"""The input side, one layer: what the user names becomes a stream of Sources to
read (or BadInputs saying why not), and a Source becomes an image's bytes.

    expand    arguments, lists, stdin, files, folders and globs -> Sources
    walk      Source and BadInput; folder walks and glob matches
    tables    Parquet / CSV / TSV / JSONL tables of inputs
    shards    WebDataset tar shards
    objects   object stores through fsspec (s3://, gs://, az://, hf://)
    parts     inputs cut into pieces any machine reads on its own (a cluster's workers)
    fetch     http(s) URLs: a well-kept client, a whole-fetch deadline, size caps
    netguard  which addresses a guarded fetch may reach
    deadline  the deadline of a whole fetch
    vetting   untrusted image headers, checked before a decoder sees them

A new kind of input is one module here, which `expand` dispatches to by name.
"""

from ofacls.sources.expand import (
    TableColumns,
    expand_inputs,
    is_url,
    parse_list,
    read_source,
    streams,
)
from ofacls.sources.walk import BadInput, Source

__all__ = ["BadInput", "Source", "TableColumns", "expand_inputs", "is_url", "parse_list", "read_source",
           "streams"]
