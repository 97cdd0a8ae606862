"""BatchNorm calibration over TMA slides whose cores have different tile sides (found by bench/load.py:
eight 25-core phantom slides with random weights, every one of the 200 samples failed in ``backbone``
with ``ValueError: need at least one array to concatenate``): the picks decide the batches' sides."""

from __future__ import annotations

from equislide import stages
from equislide.specs import FeatureSpec
from equislide.storage import read_sample_meta


def test_calibration_with_a_tile_side_that_no_picked_tile_has(tmp_path) -> None:
    from equislide.tiling import write_phantom

    stores = []
    for name, diameter in (("a", 600.0), ("b", 900.0)):  # one side per slide: cores are stored whole
        info = write_phantom(
            tmp_path / f"{name}.tiff", cores=4, mpp=4.0, core_diameter_um=diameter, missing=0
        )
        stores += [
            r.store
            for r in stages.tile_slide(info.image_path, tmp_path / "tiles", mpp=5.0, tile=128, halo=16)
        ]
    sides = {int(read_sample_meta(s)["tile_with_halo"]) for s in stores}
    assert len(sides) == 2, sides
    # Fewer calibration tiles than samples: the picks (sorted by sample ID) all come from slide "a".
    spec = FeatureSpec(layer=1, model_kwargs={"width": 8}, calibration_tiles=2, device="cpu")
    ref = stages.calibrated_backbone(stores, tmp_path / "models", spec)
    assert ref.status == "written"
