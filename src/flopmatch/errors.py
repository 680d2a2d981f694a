"""The one exception type for user errors: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (config, paths, prompts, budgets). Message says what and how to fix."""


class EchoedError(UserError):
    """A UserError of the main rank, raised again on the other ranks of a torchrun launch so that every rank stops
    (:func:`flopmatch.dist.entered_on_main`); the CLI prints it on the main rank only, once."""
