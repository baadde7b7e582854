"""Process exit codes of ``orchestrator`` commands, so scripts and schedulers can react.

A scheduler that sees ``EXIT_PREEMPTED`` knows an emergency checkpoint was committed and
the same command will resume from it.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3


def exit_code_for(error: BaseException) -> int:
    """``EXIT_BAD_INPUT`` for errors the input caused (the config, the data, a path, a
    checkpoint's contents: ``BadInputError``, or a path that does not exist), else ``EXIT_FAILURE``.

    A run only exits 0 when it finished and its final checkpoint committed, and 3 when it
    was preempted with nothing lost; those are results, not errors.
    """
    from orchestrator.errors import BadInputError

    bad_input = (BadInputError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
    return EXIT_BAD_INPUT if isinstance(error, bad_input) else EXIT_FAILURE
