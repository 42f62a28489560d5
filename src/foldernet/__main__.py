"""``python -m foldernet`` (and ``torchrun -m foldernet train ...`` for data-parallel training)."""

from .cli import main

main()
