"""The float8 storage dtype: one byte per value, float8 e4m3fn codes with a per-channel scale.

    value = float8_e4m3fn(code) * scale[layer, dim]

`code` is the stored uint8 (zarr has no float8 type), `scale` a float32 [n_layers, d_model] array stored
once per cache (the `scales` zarr array, written at creation: fixed before the first block). Every scale is
a power of two, so the product is exact in bfloat16 and float32: decoding adds no rounding of its own, and
on a GPU it runs after the copy (one byte per value crosses the bus).

The scales come from the absolute maximum of every channel over a calibration prefix of the first write
block (all positions as they are stored: special tokens included, so Gemma's ~1e5 BOS features get a
scale of their own), times HEADROOM, rounded up to a power of two, so the calibration maximum lands at
most at E4M3_MAX / HEADROOM. A value beyond E4M3_MAX * scale later on is never silently clipped: it is
counted per layer (`LayerStats.out_of_range`) and stops the harvest unless --allow-out-of-range (then it is
stored as +-E4M3_MAX * scale, and `harvest info` shows the count). docs/float8.md has the numbers.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
HEADROOM = 8.0  # calibration maximum -> at most E4M3_MAX / HEADROOM (56): room for later, larger values
CALIBRATION_TOKENS = 8192  # tokens of the first write block (whole context windows, at least one) behind the scales
FLOOR = 2.0**-20  # a channel's absmax is raised to FLOOR x its layer's largest (all-zero channels get a scale too)
NAN_CODE = 0x7F  # float8_e4m3fn NaN (no inf exists): what a non-finite value is stored as (--allow-nonfinite)


def scales_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """Per-channel scales [L, d] float32 (powers of two) from per-channel absolute maxima [L, d]."""
    a = absmax.to(torch.float64)
    layer_max = a.amax(dim=1, keepdim=True)
    layer_max = torch.where(layer_max > 0, layer_max, torch.ones_like(layer_max))  # an all-zero layer: scale 2^-6
    a = torch.maximum(a, layer_max * FLOOR)
    return torch.exp2(torch.ceil(torch.log2(a * HEADROOM / E4M3_MAX))).to(torch.float32)


def encode(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values x [L, T, d] (float, any device) -> (codes [L, T, d] uint8, out-of-range count [L] float64 on the
    CPU). A finite value beyond E4M3_MAX * scale is counted and saturates (torch's cast would saturate it
    silently); NaN and inf become the NaN code (e4m3fn has no inf)."""
    y = x.to(torch.float32) / scale.to(x.device, torch.float32)[:, None, :]
    finite = torch.isfinite(y)
    out_of_range = ((y.abs() > E4M3_MAX) & finite).sum(dim=(1, 2)).to("cpu", torch.float64)
    codes = y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    if not bool(finite.all()):
        codes = torch.where(finite, codes, torch.full_like(codes, NAN_CODE))
    return codes, out_of_range


def decode(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """THE decode: uint8 codes [L, T, d] -> values of `dtype` (exact: powers-of-two scales), on the codes'
    device. `scale` [L, d] must be on that device already (ChunkReader keeps one copy per device)."""
    return codes.view(torch.float8_e4m3fn).to(dtype) * scale.to(dtype)[:, None, :]
