"""Stage 3: cache + SAE (+ model) -> layer distributions, variance ratios, reconstruction quality (FVU,
delta CE), residual geometry, per-prompt heatmaps and one HTML report."""
