"""Stage 3: cache + SAE (+ model) -> layer distributions, variance ratios, FVU, delta CE (issue #4; not built yet)."""
