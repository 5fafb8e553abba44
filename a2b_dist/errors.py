"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class UserError(Exception):
    """Something the user must fix (a path, an argument, a file); the message says what and how."""
