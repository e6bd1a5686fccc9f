"""scancache's client side: reading a store through a scancache server (HttpSource), re-exporting the
store's value types (errors, regions, scan metadata) that client code names."""

from store.errors import (
    ArrayNotFound,
    InvalidCategories,
    InvalidParameter,
    InvalidPath,
    InvalidROI,
    PredictionMismatch,
    RequestTooLarge,
    ScanCacheError,
    ScanChanged,
    ScanNotFound,
    ServerError,
    SourceError,
    Unauthorized,
)
from store.format import ChunkLayout, ScanMeta
from store.protocol import RegionRequest, ScanSource

__all__ = [
    "ArrayNotFound",
    "ChunkLayout",
    "InvalidCategories",
    "InvalidParameter",
    "InvalidPath",
    "InvalidROI",
    "PredictionMismatch",
    "RegionRequest",
    "RequestTooLarge",
    "ScanCacheError",
    "ScanChanged",
    "ScanMeta",
    "ScanNotFound",
    "ScanSource",
    "ServerError",
    "SourceError",
    "Unauthorized",
]
