"""The one exception type for user errors: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (config, paths, prompts, budgets). Message says what and how to fix."""
