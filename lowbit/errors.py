"""User-facing errors: the CLI prints these as one clear message, without a traceback."""


class LowbitError(Exception):
    """Bad input or a failed stage; the message names the file, layer or op and how to fix it."""
