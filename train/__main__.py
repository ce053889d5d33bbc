"""`python -m train ...` (what `torchrun -m train run ...` calls)."""

from .cli import main

main()
