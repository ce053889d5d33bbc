"""`python -m harvest ...` (what `torchrun -m harvest run ...` calls)."""

from .cli import main

main()
