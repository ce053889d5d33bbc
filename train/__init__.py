"""Stage 2: cache -> TopK multi-layer SAEs (issue #3; not built yet). Reads the cache only through harvest.open_cache / harvest.ChunkReader."""
