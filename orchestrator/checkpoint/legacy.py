"""TensorFlow's V1 checkpoint format: recognised, so that the error says what it is.

A V1 checkpoint (``tf.compat.v1.train.Saver(write_version=SaverDef.V1)``, TF before
1.0) is one table file named after the prefix (or ``<prefix>-0000i-of-0000n`` when
sharded) and no ``<prefix>.index``. We read only the V2 format, so instead of "no
checkpoint found" the reader names the format and gives the one TensorFlow command
that rewrites it as V2 (TF still reads V1). Only the file's last 8 bytes are read.
"""

from __future__ import annotations

import posixpath
import re
import shlex

from orchestrator.checkpoint import coding, table
from orchestrator.checkpoint.storage import Storage

# tf.train.load_checkpoint reads V1; SaveV2 writes every tensor back as a V2 bundle.
_CONVERT = ("python -c \"import sys, tensorflow as tf; r = tf.train.load_checkpoint(sys.argv[1]); "
            "n = sorted(r.get_variable_to_shape_map()); tf.raw_ops.SaveV2(prefix=sys.argv[2], tensor_names=n, "
            "shape_and_slices=[''] * len(n), tensors=[r.get_tensor(k) for k in n])\"")


def v1_files(storage: Storage, prefix: str) -> list[str]:
    """The V1 table files of ``prefix``: the prefix itself or its ``-?????-of-?????`` shards."""
    candidates = storage.glob(prefix + "-?????-of-?????")
    if storage.exists(prefix) and not storage.isdir(prefix):
        candidates.insert(0, prefix)
    return [path for path in candidates if _ends_with_table_magic(storage, path)]


def _ends_with_table_magic(storage: Storage, path: str) -> bool:
    size = storage.size(path)
    if size < table.FOOTER_SIZE:
        return False
    (tail,) = storage.read_ranges([(path, size - 8, 8)])
    return len(tail) == 8 and coding.decode_fixed64(tail, 0) == table.MAGIC


def convert_command(prefix: str) -> str:
    """The shell command that writes ``prefix`` (V1) as a V2 checkpoint under ``<dir>/v2/``."""
    target = posixpath.join(posixpath.dirname(prefix), "v2", posixpath.basename(prefix))
    return f"{_CONVERT} {shlex.quote(prefix)} {shlex.quote(target)}"


# the files of a V2 checkpoint: a path to one of them is a common slip for its prefix
_V2_PART = re.compile(r"(\.index|\.data-\d{5}-of-\d{5})$")


def v1_message(storage: Storage, prefix: str) -> str | None:
    """The error text for a path that is not a V2 prefix but whose files say what it is: one file
    of a V2 checkpoint (an index is a table too, so it must not read as V1), or a V1 checkpoint;
    None when there is neither."""
    part = _V2_PART.search(prefix)
    if part and storage.exists(prefix[: part.start()] + ".index"):
        real = prefix[: part.start()]
        return f"{prefix} is a file of the checkpoint {real}: give its prefix {real} (no .index or .data-... suffix)"
    files = v1_files(storage, prefix)
    if not files:
        return None
    return (f"{prefix} is a TensorFlow V1-format checkpoint ({posixpath.basename(files[0])}, no .index file); "
            f"orchestrator reads the V2 format. Convert it with TensorFlow: {convert_command(prefix)}")
