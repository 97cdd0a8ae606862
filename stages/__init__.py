"""The stages of a run, one module each, in data-flow order: plain functions over specs and paths.

======================  =======================================================================
module                  stage
======================  =======================================================================
:mod:`.inputs`          sample IDs per input, records of failed inputs, one-line reasons
:mod:`.tile`            slide -> per-sample zarr tile stores (:func:`plan_slide`, :func:`write_samples`)
:mod:`.backbone`        the network every worker loads (:func:`calibrated_backbone`)
:mod:`.features`        float16 features beside the tiles, each sample's K-means draw
:mod:`.cluster`         K-means for the cohort (:func:`fit_cohort_stores`) or one sample
:mod:`.segment`         label map + OME-Zarr, overlay PNG, GeoJSON (:func:`segment_store`)
======================  =======================================================================

No Prefect and no Dask here: ``flows/`` wires these into tasks, and a notebook can run a whole
cohort by calling them in order::

    from equislide.specs import ClusterSpec, FeatureSpec, TilingSpec
    from equislide import stages

    ids, _ = stages.assign_sample_ids(paths)
    stores = [r.store for p in ids for r in stages.tile_slide(p, "out/tiles", TilingSpec(), sample_id=ids[p])]
    net = stages.calibrated_backbone(stores, "out/models", FeatureSpec(layer=3))
    for s in stores:
        stages.extract_store_features(s, net)
    km = stages.fit_cohort_stores(stores, "out/models", layer=3, spec=ClusterSpec(k=4))
    for s in stores:
        stages.segment_store(s, "out/samples", layer=3, kmeans=km)
"""

from __future__ import annotations

from equislide.stages.backbone import calibrated_backbone as calibrated_backbone
from equislide.stages.backbone import clear_backbone_cache as clear_backbone_cache
from equislide.stages.backbone import load_backbone as load_backbone
from equislide.stages.cluster import fit_cohort_stores as fit_cohort_stores
from equislide.stages.cluster import fit_store as fit_store
from equislide.stages.features import DRAWS_DIR as DRAWS_DIR
from equislide.stages.features import draw_store_vectors as draw_store_vectors
from equislide.stages.features import extract_feature_range as extract_feature_range
from equislide.stages.features import extract_store_features as extract_store_features
from equislide.stages.features import feature_ranges as feature_ranges
from equislide.stages.features import finished_feature_ranges as finished_feature_ranges
from equislide.stages.features import publish_features as publish_features
from equislide.stages.features import tile_feature_masks as tile_feature_masks
from equislide.stages.inputs import assign_sample_ids as assign_sample_ids
from equislide.stages.inputs import failed_record as failed_record
from equislide.stages.inputs import reason_of as reason_of
from equislide.stages.segment import SEGMENT_MARKER_SUFFIX as SEGMENT_MARKER_SUFFIX
from equislide.stages.segment import segment_store as segment_store
from equislide.stages.tile import SampleResult as SampleResult
from equislide.stages.tile import SlidePlan as SlidePlan
from equislide.stages.tile import plan_slide as plan_slide
from equislide.stages.tile import tile_slide as tile_slide
from equislide.stages.tile import write_samples as write_samples

__all__ = [
    "DRAWS_DIR",
    "SEGMENT_MARKER_SUFFIX",
    "SampleResult",
    "SlidePlan",
    "assign_sample_ids",
    "calibrated_backbone",
    "clear_backbone_cache",
    "draw_store_vectors",
    "extract_store_features",
    "extract_feature_range",
    "feature_ranges",
    "finished_feature_ranges",
    "publish_features",
    "failed_record",
    "fit_cohort_stores",
    "fit_store",
    "load_backbone",
    "plan_slide",
    "reason_of",
    "segment_store",
    "tile_feature_masks",
    "tile_slide",
    "write_samples",
]
