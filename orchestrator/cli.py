"""``orchestrator``: train, validate, inspect, ls and export from the command line.

Exit codes (``orchestrator.exit_codes``): 0 done (final checkpoint committed), 1 failed,
2 bad input (config, usage, data, a path, a checkpoint's contents, a checkpoint directory
that is not writable or is in use by another run), 3 preempted with nothing lost.

Heavy imports (Ray, the runtime, the checkpoint reader) happen inside the command that
needs them, so ``validate`` and ``--help`` are instant and a bad config starts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from typing import Any, Sequence

from orchestrator import __version__
from orchestrator.config import (JobConfig, dump_config, error_at, load_config, parse_options,
                                 redact)
from orchestrator.errors import BadInputError
from orchestrator.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED, exit_code_for
from orchestrator.units import human_bytes

logger = logging.getLogger("orchestrator")

CONFIG_DUMP = "config.yaml"
LOG_FILE = "train.log"


class _BadInput(BadInputError):
    """A usage problem found after parsing (exit 2)."""


# ---------------------------------------------------------------------------- helpers
def _error(message: str) -> None:
    print(f"error: {redact(message)}", file=sys.stderr)


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    return parse_options(args.storage_option or []) or None


def _describe_job(cfg: JobConfig) -> str:
    model = cfg.model.kind.value
    if cfg.model.factory:
        model = f"plug-in {cfg.model.factory}"
    elif cfg.model.kind.value == "mlp":
        model += " " + "-".join(str(h) for h in cfg.model.hidden)
    data = cfg.data.dataset.value
    if cfg.data.factory:
        data = f"plug-in {cfg.data.factory}"
    elif cfg.data.format:
        data = f"{cfg.data.format.value} {cfg.data.path}"
    workers = str(cfg.workers.min) if cfg.workers.min == cfg.workers.max else f"{cfg.workers.min}-{cfg.workers.max}"
    return (f"{cfg.name}: {model} on {data}, {workers} worker(s), {cfg.train.steps} steps, "
            f"device {cfg.device.value}, checkpoints -> {cfg.checkpoint.dir}")


# ---------------------------------------------------------------------------- validate / train
def _load_checked(args: argparse.Namespace, run_checks: Callable[[JobConfig], Any]) -> tuple[JobConfig, Any]:
    """The config, and what ``run_checks`` (plug-ins, data) returned; their errors become
    ConfigErrors located at the key at fault (exit 2)."""
    from orchestrator.checkpoint.warm_start import WarmStartError
    from orchestrator.cluster.errors import ClusterSetupError
    from orchestrator.engine.data import DatasetError
    from orchestrator.engine.protocol import PluginError

    cfg = load_config(args.config, args.set or [])
    try:
        return cfg, run_checks(cfg)
    except (PluginError, DatasetError, ClusterSetupError, WarmStartError) as exc:
        key = getattr(exc, "key", None) or ("data.path" if isinstance(exc, DatasetError) else "code.paths")
        raise error_at(args.config, args.set or [], key, str(exc)) from None


def _validate_checks(cfg: JobConfig) -> Any:
    """``validate``'s checks beyond the config: factories import; with ``init_from``, the model is
    built (reading the data) so that the warm start's names are checked against it and the checkpoint
    (returns the warm start plan, else None)."""
    from orchestrator.cluster.preflight import build_on_cpu, check_init_from, import_factories

    import_factories(cfg)
    return check_init_from(build_on_cpu(cfg)[0], cfg) if cfg.init_from is not None else None


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.checkpoint.claim import check_directory

    cfg, warm_start = _load_checked(args, _validate_checks)
    check_directory(cfg.checkpoint.dir, cfg.checkpoint.storage_options)  # read-only: e.g. a file, not a directory
    print(f"OK: {_describe_job(cfg)}")
    if warm_start is not None:  # what a fresh start would take (a rerun resumes checkpoint.dir instead)
        print("\n".join([warm_start.summary(), *warm_start.lines()]))
    if args.show:
        print(dump_config(cfg), end="")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from orchestrator.config import schema_text

    print(schema_text(), end="")
    return EXIT_OK


class _RedactFilter(logging.Filter):
    """Removes env-resolved secret values from every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


class _RedactingFormatter(logging.Formatter):
    """Redacts the formatted text too: the filter only sees the message, not the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _NotRunLines(logging.Filter):
    """Keeps the reporter's lines (``orchestrator.run``) off the console: they are on stdout already."""

    def filter(self, record: logging.LogRecord) -> bool:
        from orchestrator.monitor.reporter import RUN_LOGGER

        return record.name != RUN_LOGGER


class _BriefFormatter(_RedactingFormatter):
    """Console lines without tracebacks (they go to train.log); leaves the record intact."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text = saved


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging(cfg: JobConfig) -> list[logging.Handler]:
    """Log to ``<run_dir>/train.log`` (everything) and stderr (brief), both redacted.

    Under a live progress line, stderr only gets warnings and errors: INFO lines would
    tear the line apart; they are all in train.log. The reporter's progress, eval and
    checkpoint lines go to train.log only: the console shows them on stdout already.
    """
    level = getattr(logging, cfg.logging.level.value.upper())
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(max(level, logging.WARNING) if _live_progress(cfg) else level)
    console.addFilter(_NotRunLines())
    console.setFormatter(_RedactingFormatter(_LOG_FORMAT) if level <= logging.DEBUG else _BriefFormatter(_LOG_FORMAT))
    logfile = logging.FileHandler(os.path.join(cfg.run_dir, LOG_FILE))
    logfile.setFormatter(_RedactingFormatter(_LOG_FORMAT))
    root = logging.getLogger()
    for handler in (console, logfile):
        handler.addFilter(_RedactFilter())
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # the checkpoint library warns (e.g. a state-file entry ignored): into the log too
    return [console, logfile]


def _live_progress(cfg: JobConfig) -> bool:
    mode = cfg.logging.progress.value
    return mode == "bar" or (mode == "auto" and sys.stdout.isatty())


def _prepare_run_dir(cfg: JobConfig) -> None:
    """Create the run dir and record the config (secrets as their ${VAR} references).

    run_dir is a path the user gave: one that cannot be created or written (a file in its place,
    a read-only filesystem) is bad input (exit 2 naming it), not a failed run.
    """
    try:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, CONFIG_DUMP), "w", encoding="utf-8") as f:
            f.write(dump_config(cfg))
    except OSError as exc:
        raise _BadInput(f"run_dir '{cfg.run_dir}' is not a writable directory: {type(exc).__name__}: "
                        f"{exc}; logs and the run summary could not be written, so the job does not start") from None


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.cluster import startup

    startup.install()  # from here on SIGINT/SIGTERM stop the job cleanly, never a traceback or orphaned Ray
    try:
        from orchestrator.cluster.preflight import preflight
        from orchestrator.cluster.recipe import check_data

        def checks(cfg: JobConfig) -> Any:
            check_data(cfg, args.config)  # mnist counted without loading it
            return preflight(cfg)         # plug-ins and data: bad input too, exit 2 before anything starts

        cfg, prepared = _load_checked(args, checks)
        with startup.claim(cfg):  # a bad resume path, an unwritable or busy checkpoint.dir: exit 2, nothing written
            _prepare_run_dir(cfg)
            handlers = _setup_logging(cfg)
            try:
                return _run(cfg, prepared.dataset)
            finally:
                for handler in handlers:
                    logging.getLogger().removeHandler(handler)
                    handler.close()
    finally:
        startup.uninstall()


def _run(cfg: JobConfig, dataset: Any = None) -> int:
    from orchestrator.cluster.job import run_job
    from orchestrator.monitor.reporter import Reporter

    logger.info("starting %s", _describe_job(cfg))
    reporter = Reporter.from_config(cfg)
    try:
        result = run_job(cfg, reporter=reporter, dataset=dataset)
    except KeyboardInterrupt:  # a second Ctrl-C while the emergency checkpoint was being written
        reporter.close(_committed_on_disk(cfg), status="interrupted",
                       error="interrupted before the emergency checkpoint committed")
        _error("interrupted")
        return EXIT_FAILURE
    except Exception as exc:  # the run failed: report it, then exit 1 (2 when the input is at fault)
        logger.exception("job %s failed", cfg.name)
        message = f"{type(exc).__name__}: {exc}"
        reporter.close(getattr(exc, "result", None) or _committed_on_disk(cfg), status="failed", error=message)
        log_path = os.path.join(cfg.run_dir, LOG_FILE)
        _error(f"job {cfg.name} failed: {message} (traceback in {log_path})")
        return exit_code_for(exc)
    reporter.close(result)
    if result.preempted:
        saved = f"checkpoint {result.last_checkpoint} saved" if result.last_checkpoint else "no checkpoint yet"
        logger.warning("preempted (%s): run the same command to resume", saved)
        return EXIT_PREEMPTED
    return EXIT_OK


def _committed_on_disk(cfg: JobConfig) -> Any:
    """What the checkpoint directory's state file says is committed, for the summary of a failed run."""
    import types

    from orchestrator.checkpoint.state import get_checkpoint_state

    try:
        current = get_checkpoint_state(cfg.checkpoint.dir, storage_options=cfg.checkpoint.storage_options)
    except Exception:  # the summary must still be written
        current = None
    if current is None:
        return None
    return types.SimpleNamespace(checkpoints=list(current.all_model_checkpoint_paths),
                                 last_checkpoint=current.model_checkpoint_path)


# ---------------------------------------------------------------------------- check-model
CHECK_EXAMPLES = 8


def cmd_check_model(args: argparse.Namespace) -> int:
    from orchestrator.cluster.preflight import build_on_cpu
    from orchestrator.engine.gradcheck import run_checks

    if args.examples < 2:  # the option is at fault, not the data: say so before loading anything
        raise _BadInput(f"--examples {args.examples}: check-model needs at least 2 examples")
    cfg, (model, dataset) = _load_checked(args, build_on_cpu)
    count = min(args.examples, len(dataset.train_y))
    if count < 2:
        raise _BadInput(f"check-model needs at least 2 training examples, the data has {count}")
    print(f"checking {_describe_job(cfg).split(', ')[0]} on {count} examples")
    results = run_checks(model, dataset.train_x[:count], dataset.train_y[:count], int(cfg.seed))
    for result in results:
        print(result.line())
    failed = [r.name for r in results if not r.ok]
    if failed:
        raise _BadInput(f"check-model: {len(failed)} check(s) failed: {', '.join(failed)}")
    print(f"OK: {len(results)} checks passed")
    return EXIT_OK


# ---------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    """The table of tensors, or (with ``--tensor``/``--all-tensors``) only their values."""
    from orchestrator.checkpoint import inspect as ckpt_inspect
    from orchestrator.checkpoint.safetensors_file import open_tensors

    if args.json and (args.tensor or args.all_tensors):
        raise _BadInput("--json lists the tensors; it cannot be combined with --tensor or --all-tensors")
    reader = open_tensors(args.path, storage_options=_storage_options(args))
    if args.tensor or args.all_tensors:
        print(ckpt_inspect.format_values(reader, reader.keys() if args.all_tensors else args.tensor))
        return EXIT_OK
    rows = ckpt_inspect.describe_reader(reader)
    print(ckpt_inspect.to_json(rows) if args.json else ckpt_inspect.format_table(rows))
    return EXIT_OK


# ---------------------------------------------------------------------------- ls
LS_COLUMNS = ("STEP", "TIME (UTC)", "SIZE", "SHARDS", "KEPT BECAUSE", "PREFIX")
LS_PROBLEM_COLUMN = "PROBLEM"  # shown only when a checkpoint cannot be restored


def cmd_ls(args: argparse.Namespace) -> int:
    from orchestrator.checkpoint.manager import list_checkpoints

    infos = list_checkpoints(args.dir, storage_options=_storage_options(args))
    if args.json:
        print(json.dumps([_info_dict(i) for i in infos], indent=2))
    elif not infos:
        print(f"no committed checkpoints in {args.dir}")
    else:
        print(format_checkpoint_table(infos))
    return EXIT_OK


def _iso_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _info_dict(info: Any) -> dict:
    return {"step": info.step, "prefix": info.prefix, "timestamp": info.timestamp,
            "time_utc": _iso_time(info.timestamp), "size_bytes": info.size_bytes,
            "num_shards": info.num_shards, "reasons": list(info.reasons), "problem": info.problem}


def format_checkpoint_table(infos: Sequence[Any]) -> str:
    """The ``ls`` table: one row per checkpoint, oldest first; a PROBLEM column flags broken ones."""
    columns = LS_COLUMNS + ((LS_PROBLEM_COLUMN,) if any(i.problem for i in infos) else ())
    rows = [(str(i.step), _iso_time(i.timestamp), human_bytes(i.size_bytes), str(i.num_shards),
             ", ".join(i.reasons) or "-", os.path.basename(i.prefix), i.problem or "-")[:len(columns)]
            for i in infos]
    widths = [max(len(c), *(len(r[k]) for r in rows)) for k, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.checkpoint.export import export_checkpoint

    options = _storage_options(args)
    prefix = _resolve_prefix(args.path, options)
    out = _export_target(args.output, os.path.basename(prefix) + ".safetensors")
    exported = export_checkpoint(prefix, out, storage_options=options)
    print(f"wrote {exported.path} ({len(exported.tensors)} tensors, {human_bytes(exported.nbytes)}) from {prefix}")
    for note in exported.notes:
        print(f"note: {note}", file=sys.stderr)
    return EXIT_OK


def _export_target(output: str | None, default_name: str) -> str:
    """``-o FILE`` as given; ``-o DIR`` (an existing directory, or any path ending in /) -> DIR/<default_name>."""
    if output is None:
        return default_name
    if output.endswith(("/", os.sep)) or os.path.isdir(output):
        if "://" not in output and not os.path.isdir(output):
            raise _BadInput(f"-o {output}: directory does not exist")
        return output.rstrip("/" + os.sep) + "/" + default_name
    return output


def _resolve_prefix(path: str, options) -> str:
    """A checkpoint prefix as given, or the latest committed checkpoint of a directory."""
    from orchestrator.checkpoint.state import latest_checkpoint
    from orchestrator.checkpoint.storage import Storage

    storage, full = Storage.for_path(path, options)
    if not storage.isdir(full):
        return path
    latest = latest_checkpoint(path, storage_options=options)
    if latest is None:
        raise _BadInput(f"no committed checkpoint in directory {path}")
    return latest


# ---------------------------------------------------------------------------- parser
def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="job config YAML file (see docs/config.md)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=500 (repeatable; YAML scalar rules)")


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for remote paths, e.g. client_kwargs.endpoint_url=http://... "
                        "(repeatable; values may be ${VAR} references)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Distributed training on Ray with TensorFlow-compatible sharded checkpoints.",
        epilog="exit codes: 0 done, 1 failed, 2 bad input, 3 preempted (checkpoint saved; rerun to resume)")
    parser.add_argument("--version", action="version", version=f"orchestrator {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="run a training job from a YAML config",
                       description="Train: validate the config, then run the job on Ray (resuming per `resume`).")
    _add_config_args(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("validate", help="check a config without running anything",
                       description="Check a config (types, ranges, required keys) and print OK or one error.")
    _add_config_args(p)
    p.add_argument("--show", action="store_true", help="also print the full config with defaults filled in")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of a job config (for editors)",
                       description="Print the JSON Schema job YAML files are checked against "
                                   "(the same as docs/job.schema.json; see docs/config.md for the editor hint).")
    p.set_defaults(handler=cmd_schema)

    p = sub.add_parser("check-model", help="check a model's gradients and protocol on a few examples",
                       description="Build the job's model (built-in or plug-in) on its data and check, one line "
                                   "each: grad names/shapes/dtypes, determinism for a (seed, step, offset), "
                                   "split batch == full batch, finite-difference gradients (float64), evaluate. "
                                   "Exit 0 when all pass, 2 naming the failures.")
    _add_config_args(p)
    p.add_argument("--examples", type=int, default=CHECK_EXAMPLES, metavar="N",
                   help=f"batch size of the checks (default {CHECK_EXAMPLES})")
    p.set_defaults(handler=cmd_check_model)

    p = sub.add_parser("inspect", help="list the tensors of a checkpoint",
                       description="List a checkpoint's tensors (name, dtype, shape, size, shard), "
                                   "or print the values of some (--tensor) or all (--all-tensors).")
    p.add_argument("path", help="checkpoint prefix (…/model.ckpt-300), checkpoint directory, or an exported "
                                "*.safetensors file")
    p.add_argument("--tensor", action="append", metavar="NAME",
                   help="print this tensor's value instead of the table (repeatable; arrays over 1000 elements "
                        "are summarized)")
    p.add_argument("--all-tensors", action="store_true", help="print every tensor's value instead of the table")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    _add_storage_args(p)
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("ls", help="list the checkpoints in a directory",
                       description="Table of committed checkpoints: step, time, size, shards, why kept.")
    p.add_argument("dir", help="checkpoint directory (local path or URL)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_storage_args(p)
    p.set_defaults(handler=cmd_ls)

    p = sub.add_parser("export", help="export model parameters to another format",
                       description="Export a checkpoint's model parameters (no optimizer slots).")
    p.add_argument("path", help="checkpoint prefix, or a directory (its latest checkpoint)")
    p.add_argument("--format", required=True, choices=["safetensors"], help="output format")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output file, or a directory to write <prefix name>.safetensors into "
                        "(default: <prefix name>.safetensors here)")
    _add_storage_args(p)
    p.set_defaults(handler=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Exception as exc:  # one line; 2 for bad input, 1 for any other failure
        code = exit_code_for(exc)
        _error(str(exc) if code != EXIT_FAILURE else f"{type(exc).__name__}: {exc}")
        return code


if __name__ == "__main__":
    sys.exit(main())
