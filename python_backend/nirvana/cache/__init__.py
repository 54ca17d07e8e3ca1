"""The approximate latent cache: similarity index, tiered latent store and eviction policies."""

from nirvana.cache.engine import CacheKey, LatentCache, LookupResult

__all__ = ["CacheKey", "LatentCache", "LookupResult"]
