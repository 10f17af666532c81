"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class StreamSVDError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""
