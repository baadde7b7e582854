#!/usr/bin/env python
"""Regenerate orchestrator/checkpoint/protos/*_pb2.py from the .proto files next to them.

The generated modules are kept in the package so installing needs no protoc. protoc
embeds a runtime check (``ValidateProtobufRuntimeVersion``) that rejects any protobuf
runtime older than the protoc that generated the code (here 7.35) or of another major
version; TensorFlow pins its own protobuf, so that check would make the package
unimportable next to an older TF. The generated code itself only uses the builder API
(protobuf >= 3.20), so this script removes the check.

Usage: python scripts/gen_protos.py [--check]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "orchestrator" / "checkpoint" / "protos"

_RUNTIME_IMPORT = re.compile(r"^from google\.protobuf import runtime_version as _runtime_version\n", re.M)
_RUNTIME_CHECK = re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:    .*\n)*?\)\n", re.M)
_NO_CHECKIN = "# NO CHECKED-IN PROTOBUF GENCODE\n"
_NOTE = "# Post-processed by scripts/gen_protos.py: runtime version check removed (protobuf >= 3.20 works).\n"


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def strip_runtime_check(text: str) -> str:
    """Remove protoc's runtime version pin from one generated module."""
    text, n_import = _RUNTIME_IMPORT.subn("", text)
    text, n_check = _RUNTIME_CHECK.subn("", text)
    if n_import != n_check:
        raise RuntimeError("unexpected gencode layout: runtime version check not found whole")
    return text.replace(_NO_CHECKIN, _NOTE)


def generate() -> dict[str, str]:
    """Run protoc on every .proto; return ``{module file name: post-processed source}``."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        rel = [str(p.relative_to(REPO)) for p in proto_files()]
        args = ["protoc", f"-I{REPO}", f"--python_out={out}", *rel]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        generated = pathlib.Path(out) / PROTO_DIR.relative_to(REPO)
        return {p.name: strip_runtime_check(p.read_text()) for p in sorted(generated.glob("*_pb2.py"))}


def stale_modules(modules: dict[str, str]) -> list[str]:
    """Names of modules whose checked-in copy differs from ``modules``."""
    return [name for name, text in modules.items()
            if not (PROTO_DIR / name).exists() or (PROTO_DIR / name).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale modules; exit 1 if any")
    args = parser.parse_args(argv)
    modules = generate()
    stale = stale_modules(modules)
    if args.check:
        for name in stale:
            print(f"stale: {PROTO_DIR / name}")
        return 1 if stale else 0
    for name in stale:
        (PROTO_DIR / name).write_text(modules[name])
        print(f"wrote {PROTO_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
