"""`python -m analyze ...` (what `torchrun -m analyze variance ...` calls)."""

from .cli import main

main()
