"""Process exit codes of ``orchestrator`` commands, so scripts and schedulers can react.

A scheduler that sees ``EXIT_PREEMPTED`` knows an emergency checkpoint was committed and
the same command will resume from it.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3
