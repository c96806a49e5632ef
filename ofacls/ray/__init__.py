"""ofacls on a Ray cluster: the batch path as a Ray Data pipeline.

    import ray
    from ofacls.ray import classify_dataset

    ds = classify_dataset(["cat.jpg", "https://example.com/dog.png"], model="path/to/model")
    for row in ds.iter_rows():
        print(row["input"], row["label"], row["score"])

`ClassifyBatch` is the callable class for `Dataset.map_batches`: each actor
loads the Classifier once (a model id is resolved on the actor's node, which
downloads it at most once per node) and turns a batch of rows naming images
into rows of ofacls' schema (`OUTPUT_COLUMNS`), classifying them through
ofacls' own batch path (`runner.iter_predictions`: loader threads, batches,
per-image retry). An input that cannot be read, fetched, decoded or classified
becomes an error row, never an exception: Ray Data fails the whole dataset on
one exception in a user function, and does not retry it.

`run_batch` is `ofacls batch --engine ray`: the driver tags each input with its
sequence number, the cluster classifies a model batch per actor call, and the
driver alone hands the rows out as each batch comes back, in input order and
each sequence number once, so a block that Ray recomputes after losing a worker
or a node cannot give an input two rows. `run_parts` is the same for tables
and shards, which the cluster's workers read themselves (ofacls.sources.parts),
so their rows never pass through the driver on the way in. `check_address`
tells in seconds that no cluster answers at an address (ray.init would retry
for minutes).

Importing this module does not import Ray (or torch): `require_ray` does.
"""

from ofacls.ray.driver import ClusterError, InOrder, check_address, connected, run_batch, run_parts
from ofacls.ray.pipeline import (
    INSTALL_HINT,
    LOST,
    OUTPUT_COLUMNS,
    ClassifyBatch,
    Settings,
    build_pipeline,
    call_blocks,
    classify_dataset,
    default_gpus,
    pool_size,
    prediction_table,
    require_ray,
    resolve_on_node,
    row_prediction,
)

__all__ = ["INSTALL_HINT", "LOST", "OUTPUT_COLUMNS", "ClassifyBatch", "ClusterError", "InOrder",
           "Settings", "build_pipeline", "call_blocks", "check_address", "classify_dataset", "connected",
           "default_gpus", "pool_size", "prediction_table", "require_ray", "resolve_on_node",
           "row_prediction", "run_batch", "run_parts"]
