"""Stage 1: model + text -> a sharded zarr cache of every layer's residual stream."""

from .cache import Cache, open_cache
from .errors import UserError
from .reader import Chunk, ChunkReader
from .spec import CacheSpec

__all__ = ["Cache", "CacheSpec", "Chunk", "ChunkReader", "UserError", "open_cache"]
