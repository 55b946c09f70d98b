"""Errors a user causes and can fix (a flag, a path, a file), as opposed to bugs.

Entry points (train, fit_teacher, tools/) print these as ONE line from rank 0 and exit non-zero, without a
traceback (``megatron_qvgen.cli``); anything else keeps its traceback, because then the code is at fault.
"""


class UserError(Exception):
    """Base of the errors the user can fix; the message says what is wrong and, where it can, how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid or inconsistent; the message names the field."""
