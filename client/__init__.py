"""scancache's client side: the store format, the scan-reading protocol and its sources."""

from client.errors import (
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
from client.layout import ChunkLayout, ScanMeta
from client.protocol import RegionRequest, ScanSource

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
