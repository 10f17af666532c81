"""The exceptions the CLI turns into a one-line message and an exit code a script can use:

0    success
2    bad input (arguments, checkpoint, calibration text, settings of a run to resume)
3    not enough resources: memory, disk or device by the plan (`--dry-run` included),
     a full disk, device out of memory, or the run directory in use by another run
4    I/O failure (a read or write failed); finished blocks are kept, rerun to resume
130  interrupted (Ctrl-C); rerun the same command to resume
143  stopped by SIGTERM (128 + 15, as the shell reports it); rerun the same command to resume
"""

EXIT_BAD_INPUT, EXIT_RESOURCES, EXIT_IO, EXIT_INTERRUPTED = 2, 3, 4, 130
EXIT_TERMINATED = 143


class StreamSVDError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""

    exit_code = EXIT_BAD_INPUT


class NotEnoughResources(StreamSVDError):
    """Memory, disk or device are short, or another run holds the run directory."""

    exit_code = EXIT_RESOURCES


class RunIOError(StreamSVDError):
    """A read or write failed for a reason other than space."""

    exit_code = EXIT_IO


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's, `kill`'s), raised where the run is, as Ctrl-C raises
    KeyboardInterrupt: the run stops the same way and records why."""

    def __init__(self):
        super().__init__("stopped by SIGTERM")
