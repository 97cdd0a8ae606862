"""equislide.storage: the per-sample zarr v3 tile store, sample IDs, content hashes and done-markers.

See ``storage/README.md`` (and :mod:`equislide.storage.tile_store`) for the store layout. This package
imports only numpy at import time; zarr and dask are imported when a store is opened.
"""

from __future__ import annotations

from equislide.storage._errors import IncompleteSampleError as IncompleteSampleError
from equislide.storage._errors import SampleIdError as SampleIdError
from equislide.storage._errors import StoreLayoutError as StoreLayoutError
from equislide.storage.features import FEATURES_DONE_MARKER as FEATURES_DONE_MARKER
from equislide.storage.features import FEATURES_FORMAT as FEATURES_FORMAT
from equislide.storage.features import FeaturesPublished as FeaturesPublished
from equislide.storage.features import FeatureWriter as FeatureWriter
from equislide.storage.features import RangeFeatureWriter as RangeFeatureWriter
from equislide.storage.features import done_feature_ranges as done_feature_ranges
from equislide.storage.features import feature_shard_tiles as feature_shard_tiles
from equislide.storage.features import features_key as features_key
from equislide.storage.features import features_path as features_path
from equislide.storage.features import features_problem as features_problem
from equislide.storage.features import is_features_done as is_features_done
from equislide.storage.features import open_feature_ranges as open_feature_ranges
from equislide.storage.features import open_features as open_features
from equislide.storage.features import open_features_for_write as open_features_for_write
from equislide.storage.features import publish_feature_ranges as publish_feature_ranges
from equislide.storage.features import read_features_meta as read_features_meta
from equislide.storage.figures import stack_strips as stack_strips
from equislide.storage.figures import write_angle_plot as write_angle_plot
from equislide.storage.figures import write_label_strip as write_label_strip
from equislide.storage.geojson import feature_id as feature_id
from equislide.storage.geojson import labels_to_geojson as labels_to_geojson
from equislide.storage.geojson import tma_cores_to_geojson as tma_cores_to_geojson
from equislide.storage.geojson import write_geojson as write_geojson
from equislide.storage.hashing import canonical_json as canonical_json
from equislide.storage.hashing import params_hash as params_hash
from equislide.storage.hashing import sha256_file as sha256_file
from equislide.storage.ids import STORE_SUFFIX as STORE_SUFFIX
from equislide.storage.ids import safe_sample_id as safe_sample_id
from equislide.storage.ids import sample_store_path as sample_store_path
from equislide.storage.ids import split_sample_id as split_sample_id
from equislide.storage.ids import unique_sample_ids as unique_sample_ids
from equislide.storage.labels import NO_TISSUE as NO_TISSUE
from equislide.storage.labels import PALETTE as PALETTE
from equislide.storage.labels import TilePlane as TilePlane
from equislide.storage.labels import downsample_plane as downsample_plane
from equislide.storage.labels import label_color as label_color
from equislide.storage.labels import stitch_image as stitch_image
from equislide.storage.labels import stitch_labels as stitch_labels
from equislide.storage.labels import stitch_store as stitch_store
from equislide.storage.labels import tile_plane as tile_plane
from equislide.storage.lock import LOCK_NAME as LOCK_NAME
from equislide.storage.lock import OutputLocked as OutputLocked
from equislide.storage.lock import acquire_output_lock as acquire_output_lock
from equislide.storage.lock import output_lock as output_lock
from equislide.storage.lock import release_output_lock as release_output_lock
from equislide.storage.manifest import RunManifest as RunManifest
from equislide.storage.manifest import collect_versions as collect_versions
from equislide.storage.manifest import describe_inputs as describe_inputs
from equislide.storage.manifest import read_manifest as read_manifest
from equislide.storage.manifest import write_manifest as write_manifest
from equislide.storage.ome import NGFF_VERSION as NGFF_VERSION
from equislide.storage.ome import ngff_attrs as ngff_attrs
from equislide.storage.ome import validate_image_attrs as validate_image_attrs
from equislide.storage.ome import validate_label_attrs as validate_label_attrs
from equislide.storage.ome import write_image_levels as write_image_levels
from equislide.storage.ome import write_ome_zarr as write_ome_zarr
from equislide.storage.overlay import render_overlay as render_overlay
from equislide.storage.overlay import thumbnail_data_uri as thumbnail_data_uri
from equislide.storage.overlay import write_overlay_png as write_overlay_png
from equislide.storage.tile_store import DONE_MARKER as DONE_MARKER
from equislide.storage.tile_store import RANGES_DIR as RANGES_DIR
from equislide.storage.tile_store import STORE_FORMAT as STORE_FORMAT
from equislide.storage.tile_store import RangedSampleStore as RangedSampleStore
from equislide.storage.tile_store import SampleWriter as SampleWriter
from equislide.storage.tile_store import clean_partials as clean_partials
from equislide.storage.tile_store import is_sample_done as is_sample_done
from equislide.storage.tile_store import open_sample_for_write as open_sample_for_write
from equislide.storage.tile_store import open_sample_ranges as open_sample_ranges
from equislide.storage.tile_store import open_tiles as open_tiles
from equislide.storage.tile_store import ranged_partial_path as ranged_partial_path
from equislide.storage.tile_store import read_sample_meta as read_sample_meta
from equislide.storage.tile_store import store_identity as store_identity
from equislide.storage.tile_store import store_problem as store_problem
from equislide.storage.tile_store import tile_shard_tiles as tile_shard_tiles

__all__ = [
    "FEATURES_DONE_MARKER",
    "stack_strips",
    "write_angle_plot",
    "write_label_strip",
    "features_key",
    "store_identity",
    "FEATURES_FORMAT",
    "FeatureWriter",
    "features_path",
    "is_features_done",
    "open_features",
    "open_features_for_write",
    "open_feature_ranges",
    "done_feature_ranges",
    "feature_shard_tiles",
    "RangeFeatureWriter",
    "FeaturesPublished",
    "publish_feature_ranges",
    "read_features_meta",
    "feature_id",
    "labels_to_geojson",
    "tma_cores_to_geojson",
    "write_geojson",
    "NO_TISSUE",
    "PALETTE",
    "label_color",
    "stitch_image",
    "stitch_labels",
    "stitch_store",
    "TilePlane",
    "downsample_plane",
    "tile_plane",
    "NGFF_VERSION",
    "ngff_attrs",
    "RunManifest",
    "collect_versions",
    "describe_inputs",
    "read_manifest",
    "write_manifest",
    "validate_image_attrs",
    "validate_label_attrs",
    "write_image_levels",
    "write_ome_zarr",
    "render_overlay",
    "thumbnail_data_uri",
    "write_overlay_png",
    "DONE_MARKER",
    "RANGES_DIR",
    "STORE_FORMAT",
    "STORE_SUFFIX",
    "IncompleteSampleError",
    "SampleIdError",
    "RangedSampleStore",
    "SampleWriter",
    "StoreLayoutError",
    "canonical_json",
    "clean_partials",
    "is_sample_done",
    "open_sample_for_write",
    "open_sample_ranges",
    "ranged_partial_path",
    "open_tiles",
    "params_hash",
    "read_sample_meta",
    "safe_sample_id",
    "sample_store_path",
    "sha256_file",
    "split_sample_id",
    "unique_sample_ids",
    "LOCK_NAME",
    "OutputLocked",
    "acquire_output_lock",
    "output_lock",
    "release_output_lock",
    "features_problem",
    "store_problem",
    "tile_shard_tiles",
]
