"""One exception type for bad user input.

Anything raised as ``UserError`` reaches the user as a single line on stderr
(``error: <message>``) with exit status 2, never as a traceback. The message
must name the problem and the fix.
"""


class UserError(Exception):
    """Bad input from the command line or a config: shown as one line, no traceback."""
