"""equislide.storage: the per-sample zarr v3 tile store, sample IDs, content hashes and done-markers.

See ``storage/README.md`` (and :mod:`equislide.storage.tile_store`) for the store layout. This package
imports only numpy at import time; zarr and dask are imported when a store is opened.
"""

from __future__ import annotations

from equislide.storage._errors import IncompleteSampleError as IncompleteSampleError
from equislide.storage._errors import SampleIdError as SampleIdError
from equislide.storage._errors import StoreLayoutError as StoreLayoutError
from equislide.storage.hashing import canonical_json as canonical_json
from equislide.storage.hashing import params_hash as params_hash
from equislide.storage.hashing import sha256_file as sha256_file
from equislide.storage.ids import STORE_SUFFIX as STORE_SUFFIX
from equislide.storage.ids import safe_sample_id as safe_sample_id
from equislide.storage.ids import sample_store_path as sample_store_path
from equislide.storage.ids import split_sample_id as split_sample_id
from equislide.storage.ids import unique_sample_ids as unique_sample_ids
from equislide.storage.tile_store import DONE_MARKER as DONE_MARKER
from equislide.storage.tile_store import STORE_FORMAT as STORE_FORMAT
from equislide.storage.tile_store import SampleWriter as SampleWriter
from equislide.storage.tile_store import clean_partials as clean_partials
from equislide.storage.tile_store import is_sample_done as is_sample_done
from equislide.storage.tile_store import open_sample_for_write as open_sample_for_write
from equislide.storage.tile_store import open_tiles as open_tiles
from equislide.storage.tile_store import read_sample_meta as read_sample_meta

__all__ = [
    "DONE_MARKER",
    "STORE_FORMAT",
    "STORE_SUFFIX",
    "IncompleteSampleError",
    "SampleIdError",
    "SampleWriter",
    "StoreLayoutError",
    "canonical_json",
    "clean_partials",
    "is_sample_done",
    "open_sample_for_write",
    "open_tiles",
    "params_hash",
    "read_sample_meta",
    "safe_sample_id",
    "sample_store_path",
    "sha256_file",
    "split_sample_id",
    "unique_sample_ids",
]
