"""``python -m flopmatch.cli ...`` (e.g. under torchrun): the same as the ``flopmatch`` command."""

from flopmatch.cli import entry

entry()
