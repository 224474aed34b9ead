"""``python -m dtypelab.cli``: the ``dtypelab`` command without the console script."""

from . import entry

entry()
