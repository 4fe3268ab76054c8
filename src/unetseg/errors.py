"""The one exception type for user mistakes.

A ``UnetsegError`` message names the file or value at fault and, where there is one, the fix.
The CLI prints it and exits with status 2 (``--debug`` shows the traceback). Bugs are not wrapped.

Example:
    >>> from unetseg.errors import UnetsegError
    >>> raise UnetsegError("masks/003.png: label 25 >= n_classes 23 (412 pixels)")
    Traceback (most recent call last):
    ...
    unetseg.errors.UnetsegError: masks/003.png: label 25 >= n_classes 23 (412 pixels)
"""


class UnetsegError(Exception):
    """A user error (bad input, bad option) with a message fit to print as is."""
