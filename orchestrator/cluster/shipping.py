"""Ship the job's plug-in code to every worker, on every node, through Ray's runtime_env.

A job whose config names a factory (``model.factory``, ``data.factory``,
``optimizer.factory``) needs that module in every worker process. The runtime ships:

- ``code.paths`` empty (the default): the job directory (the directory the job runs in)
  as ``working_dir``; every worker then runs in an unpacked copy of it, so
  ``my_models:build`` imports there as it does on the driver. Under
  ``ray job submit --working-dir DIR`` the job already runs in DIR's copy on every node,
  and nothing more is shipped.
- ``code.paths: [pkg_dir, module.py]``: those packages and files as ``py_modules``.

Never shipped: ``.git``, ``runs/``, ``__pycache__``, the job's run and checkpoint
directories when they lie inside the job directory, what ``.gitignore``/``.rayignore``
exclude, and ``code.excludes``. What is left must fit ``code.max_size_mb``; else the job
stops before starting, naming the largest entries.

Workers run in another directory than the driver, so relative paths in the config are
made absolute on the driver (``absolute_paths``) before the config reaches them.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from orchestrator.cluster.errors import ClusterSetupError
from orchestrator.units import human_bytes

ALWAYS_EXCLUDED = (".git/", "runs/", "__pycache__/", "*.pyc", ".venv/", "venv/")
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a driver started by `ray job submit`
MIB = 1 << 20


class CodeTooLargeError(ClusterSetupError):
    """The code to ship is larger than ``code.max_size_mb``."""

    key = "code.max_size_mb"


def uses_plugins(config) -> bool:
    return any(getattr(config, group).factory for group in ("model", "data", "optimizer"))


def needs_shipping(config) -> bool:
    return uses_plugins(config) or bool(config.code.paths)


def actor_runtime_env(config, job_env: dict | None = None) -> dict | None:
    """The workers' runtime_env with the code uploaded to the cluster (None: nothing to ship).

    Ray accepts local paths only in a job-level runtime_env (``ray.init``); the actors of a
    job started on a Ray someone else initialised get the code the way ``ray.init`` ships
    it: packed (same excludes), uploaded once per content hash, referenced by URI.
    """
    env = runtime_env(config, job_env)
    return None if env is None else _upload(env)


def _upload(env: dict) -> dict:
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    scratch = tempfile.mkdtemp(prefix="orchestrator-code-")
    try:
        for upload in (upload_py_modules_if_needed, upload_working_dir_if_needed):
            kwargs = {"scratch_dir": scratch}
            if "include_gitignore" in inspect.signature(upload).parameters:
                kwargs["include_gitignore"] = True
            env = upload(dict(env), **kwargs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    env.pop("excludes", None)
    return env


def runtime_env(config, job_env: dict | None = None) -> dict | None:
    """The runtime_env with local paths (None: nothing to ship). ``job_env``: the job-level
    runtime_env the driver runs under (``ray.get_runtime_context().runtime_env``)."""
    if not needs_shipping(config):
        return None
    if config.code.paths:
        return {"py_modules": [os.path.abspath(p) for p in config.code.paths],
                "excludes": excludes(config, os.getcwd())}
    if (job_env or {}).get("working_dir"):
        return None  # ray job submit --working-dir: every worker already runs in that directory
    root = os.getcwd()
    return {"working_dir": root, "excludes": excludes(config, root)}


def excludes(config, root: str) -> list[str]:
    """gitignore-style patterns never shipped (relative to ``root``)."""
    patterns = list(ALWAYS_EXCLUDED) + list(config.code.excludes)
    for path in (config.checkpoint.dir, config.run_dir):
        inside = _inside(path, root)
        if inside:
            patterns.append("/" + inside.strip("/") + "/")
    return patterns


def _inside(path: str | None, root: str) -> str | None:
    """``path`` relative to ``root`` if it is a local path under it."""
    if not path or "://" in path:
        return None
    relative = os.path.relpath(os.path.abspath(path), root)
    return None if relative.startswith("..") or relative == "." else relative


def submitted_with_working_dir() -> bool:
    """True in a driver started by ``ray job submit --working-dir`` (before connecting to Ray)."""
    try:
        return bool(json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("runtime_env", {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


def check_size(config) -> int:
    """Bytes that would be shipped; ``CodeTooLargeError`` above ``code.max_size_mb``."""
    if not needs_shipping(config) or (not config.code.paths and submitted_with_working_dir()):
        return 0
    root = os.getcwd()
    roots = [os.path.abspath(p) for p in config.code.paths] or [root]
    for path in roots:
        if not os.path.exists(path):
            raise ClusterSetupError(f"code.paths: {path} does not exist")
    sizes: dict[str, int] = {}
    for path in roots:
        sizes.update(shipped_files(path, excludes(config, root)))
    total = sum(sizes.values())
    limit = float(config.code.max_size_mb) * MIB
    if total > limit:
        raise CodeTooLargeError(_too_large(roots, sizes, total, config.code.max_size_mb))
    return total


def shipped_files(root: str, patterns: list[str]) -> dict[str, int]:
    """path -> size of every file Ray would ship from ``root`` with ``patterns`` excluded
    (and what .gitignore/.rayignore files exclude), walked with Ray's own rules."""
    sizes: dict[str, int] = {}
    base = Path(root)

    def visit(path: Path) -> None:
        if path.is_file():
            sizes[str(path)] = path.stat().st_size

    if base.is_file():
        visit(base)
        return sizes
    _walk(base, patterns, visit)
    return sizes


def _walk(base: Path, patterns: list[str], visit: Callable[[Path], None]) -> None:
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    kwargs = {"include_gitignore": True} if "include_gitignore" in inspect.signature(_dir_travel).parameters else {}
    _dir_travel(base, [_get_excludes(base, patterns)], visit, **kwargs)


def _too_large(roots: list[str], sizes: dict[str, int], total: int, limit_mb: float) -> str:
    tops: dict[str, int] = {}
    for path, size in sizes.items():
        root = next(r for r in roots if path == r or path.startswith(r.rstrip(os.sep) + os.sep))
        top = os.path.relpath(path, root).split(os.sep)[0] if path != root else os.path.basename(path)
        tops[top] = tops.get(top, 0) + size
    largest = sorted(tops.items(), key=lambda item: -item[1])[:3]
    listed = ", ".join(f"{name} ({human_bytes(size)})" for name, size in largest)
    where = " and ".join(roots)
    return (f"the plug-in code to ship to the workers ({where}) is {human_bytes(total)}, over "
            f"code.max_size_mb={limit_mb:g}; largest: {listed}. Run the job from a directory holding only "
            f"the code, list the packages in code.paths, or exclude the rest with code.excludes "
            f"(or a .rayignore file)")


def absolute_paths(config) -> Any:
    """``config`` with its local paths made absolute (workers run in another directory)."""
    resume = config.resume if config.resume in ("auto", "never") else _absolute(config.resume)
    init_from = config.init_from and {"checkpoint": _absolute(config.init_from.checkpoint)}
    return config.replace(checkpoint={"dir": _absolute(config.checkpoint.dir)},
                          data={"path": _absolute(config.data.path), "eval_path": _absolute(config.data.eval_path)},
                          resume=resume, **({"init_from": init_from} if init_from else {}))


def _absolute(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))
