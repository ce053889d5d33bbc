"""Stage 2: cache -> TopK multi-layer SAEs. Reads the cache only through harvest.open_cache / ChunkReader."""

from train.sae import SaeConfig, TopKSae, load_sae

__all__ = ["SaeConfig", "TopKSae", "load_sae"]
