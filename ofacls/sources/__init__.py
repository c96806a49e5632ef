"""The input side's kinds beyond files, folders, globs, lists and URLs (ofacls.inputs
expands them all): tables, WebDataset shards and object stores, one module each."""
