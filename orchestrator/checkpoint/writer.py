"""``write_checkpoint``: a whole checkpoint from one process, sharded and written in parallel.

A thin entry point to the save pipeline (``pipeline``): tensors are spread over
``num_shards`` data files balanced by bytes, written by parallel threads, then the index
commits the checkpoint. The state file is not touched (that is the Saver's/manager's job).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from orchestrator.checkpoint import pipeline
from orchestrator.checkpoint.pipeline import plan_shards  # noqa: F401  (public since the first release)
from orchestrator.checkpoint.storage import Storage


def write_checkpoint(prefix: str, tensors: Mapping[str, Any], num_shards: int = 1,
                     storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``tensors`` as a complete checkpoint at ``prefix``; returns ``prefix``.

    Values are numpy (or cupy) arrays or ``Variable``s; object arrays of ``bytes``/``str``
    are stored as DT_STRING (numpy ``S`` arrays drop trailing NULs, as numpy does).
    Raises ``SaveFailedError`` naming every failed shard if any shard or the index fails;
    then nothing was committed and nothing is left behind.
    """
    pipeline.check_prefix(prefix)
    storage, path = Storage.for_path(prefix, storage_options)
    pipeline.save(storage, path, tensors, num_shards)
    return os.fspath(prefix)
