"""K-means: every backend that can run here recovers blobs, is seeded, and labels in one canonical order."""

from __future__ import annotations

import importlib.util
import json
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from equislide.models import (
    CheckpointError,
    KMeansError,
    KMeansModel,
    KMeansParams,
    OptionalDependencyError,
    ReservoirSampler,
    StratifiedSampler,
    canonical_order,
    fit_cohort,
    fit_kmeans,
    fit_per_sample,
    l2_normalise,
    masked_vectors,
    resnet18,
    resolve_backend,
    save_checkpoint,
)

N_FEATURES = 8


def _cuml_ready() -> str | None:
    if importlib.util.find_spec("cuml") is None:
        return "cuML is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


@pytest.fixture(params=["torch", "sklearn", "cuml"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "cuml" and (reason := _cuml_ready()):
        pytest.skip(f"cuml backend: {reason}")
    return request.param


def _params(backend: str, **kwargs) -> KMeansParams:
    defaults = {"k": 4, "backend": backend, "device": "cpu", "sample_size": 1000, "batch_size": 700}
    return KMeansParams(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n_samples=3000, centers=4, n_features=N_FEATURES, cluster_std=0.5, random_state=1)
    return x.astype(np.float32), y


def _make_chunk(centres: np.ndarray, i: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``i`` of a blob stream (vectors, true labels), reproducible from ``(seed, i)`` alone."""
    rng = np.random.default_rng((seed, i))
    labels = rng.integers(0, len(centres), size)
    return (centres[labels] + rng.normal(0.0, 0.5, (size, centres.shape[1]))).astype(np.float32), labels


def test_recovers_separated_blobs(backend: str, blobs) -> None:
    x, y = blobs
    model = fit_kmeans(x, params=_params(backend))
    assert model.backend == backend
    assert model.centroids.shape == (4, N_FEATURES) and model.centroids.dtype == np.float32
    assert model.n_vectors == 3000
    assert adjusted_rand_score(y, model.predict(x)) >= 0.99


def test_same_seed_same_centroids(backend: str, blobs) -> None:
    x, _ = blobs
    a = fit_kmeans(x, params=_params(backend, seed=7))
    b = fit_kmeans(x, params=_params(backend, seed=7))
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia


def test_canonical_order_agrees_between_torch_and_sklearn(blobs) -> None:
    x, _ = blobs
    by_torch = fit_kmeans(x, params=_params("torch", seed=3))
    by_sklearn = fit_kmeans(x, params=_params("sklearn", seed=11))
    np.testing.assert_allclose(by_torch.centroids, by_sklearn.centroids, atol=1e-4)
    np.testing.assert_array_equal(by_torch.predict(x), by_sklearn.predict(x))
    norms = np.linalg.norm(by_torch.centroids, axis=1)
    assert np.all(np.diff(norms) > 0)  # the rule: increasing norm


def test_canonical_order_rule() -> None:
    c = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -2.0]])
    np.testing.assert_array_equal(canonical_order(c), [1, 2, 3, 0])  # norm tie: (0, 1) < (1, 0)
    # A permutation of the same centroids sorts to the same rows.
    perm = np.array([3, 0, 2, 1])
    np.testing.assert_array_equal(c[perm][canonical_order(c[perm])], c[canonical_order(c)])


def test_predict_on_feature_maps(backend: str) -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=(2, 12, 10))
    centres = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 0, 5.0]], dtype=np.float32)
    maps = np.moveaxis(centres[truth], -1, 1) + rng.normal(0, 0.1, (2, 4, 12, 10)).astype(np.float32)
    model = fit_kmeans(
        masked_vectors(maps), params=KMeansParams(k=3, backend=backend, device="cpu", batch_size=37)
    )
    labels = model.predict(maps, batch_size=23)  # slabs smaller than a row and not dividing h
    assert labels.shape == (2, 12, 10) and labels.dtype == np.int64
    assert adjusted_rand_score(truth.ravel(), labels.ravel()) == 1.0
    one = model.predict(maps[1])
    assert one.shape == (12, 10)
    np.testing.assert_array_equal(one, labels[1])
    as_tensor = model.predict(torch.from_numpy(maps[1]).half())
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (12, 10)
    np.testing.assert_array_equal(as_tensor.numpy(), one)
    with pytest.raises(KMeansError, match="cannot predict on shape"):
        model.predict(np.zeros((5, 3), dtype=np.float32))


def test_streaming_fit_matches_in_memory_and_holds_one_chunk() -> None:
    n_chunks, size, seed = 50, 400, 5
    centres = np.random.default_rng(seed).normal(0.0, 10.0, size=(4, N_FEATURES)).astype(np.float32)
    alive: list[weakref.ref] = []
    peak = [0]

    def stream():
        for i in range(n_chunks):
            # Every chunk handed out before must be gone when the next one is made.
            peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
            chunk, _ = _make_chunk(centres, i, size, seed)
            alive.append(weakref.ref(chunk))
            yield chunk
            del chunk

    params = KMeansParams(k=4, backend="torch", device="cpu", sample_size=2000, seed=1)
    streamed = fit_kmeans(stream, params=params)  # a callable: exact Lloyd passes over all vectors
    assert peak[0] == 0, f"{peak[0]} earlier chunks were still referenced"
    assert streamed.n_vectors == streamed.n_fit_vectors == n_chunks * size

    parts = [_make_chunk(centres, i, size, seed) for i in range(n_chunks)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    in_memory = fit_kmeans(x, params=KMeansParams(k=4, backend="sklearn", seed=1))
    assert adjusted_rand_score(y, streamed.predict(x)) >= 0.99
    np.testing.assert_allclose(streamed.centroids, in_memory.centroids, atol=1e-3)
    np.testing.assert_array_equal(streamed.predict(x), in_memory.predict(x))

    # A one-shot generator is read once and fitted on its reservoir sample.
    once = fit_kmeans(stream(), params=params)
    assert once.n_vectors == n_chunks * size and once.n_fit_vectors == 2000
    assert adjusted_rand_score(y, once.predict(x)) >= 0.99


def test_stream_that_changes_between_passes_is_refused() -> None:
    calls = [0]

    def shrinking():
        calls[0] += 1
        rng = np.random.default_rng(0)
        for _ in range(5 - calls[0]):
            yield rng.normal(size=(100, 3)).astype(np.float32)

    with pytest.raises(KMeansError, match="same vectors on every call"):
        fit_kmeans(shrinking, params=KMeansParams(k=2, backend="torch", device="cpu", sample_size=50))


def test_save_load_round_trip_is_exact(tmp_path: Path, blobs) -> None:
    x, _ = blobs
    model = fit_kmeans(x, params=_params("torch", l2_normalise=True, k=np.int64(4)))  # numpy ints save too
    path = model.save(tmp_path / "km" / "model.safetensors", provenance={"samples": ["a", "b"]})
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["format"] == "equislide-kmeans" and sidecar["backend"] == "torch"
    assert sidecar["params"]["l2_normalise"] is True and len(sidecar["sha256"]) == 64
    for source in (path, path.with_suffix(".json")):
        loaded = KMeansModel.load(source)
        np.testing.assert_array_equal(loaded.centroids, model.centroids)
        assert loaded.params == model.params
        assert (loaded.inertia, loaded.n_iter, loaded.n_vectors) == (
            model.inertia,
            model.n_iter,
            model.n_vectors,
        )
        np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    path.with_suffix(".json").unlink()  # the embedded document alone still loads
    np.testing.assert_array_equal(KMeansModel.load(path).centroids, model.centroids)


def _load_error(path: Path, *words: str) -> None:
    with pytest.raises(CheckpointError) as info:
        KMeansModel.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path.stem) in message
    for word in words:
        assert word in message, message


def test_foreign_and_corrupt_files_are_refused(tmp_path: Path, blobs) -> None:
    x, _ = blobs
    path = fit_kmeans(x, params=_params("torch")).save(tmp_path / "m.safetensors")

    _load_error(tmp_path / "missing.safetensors", "no such file")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _load_error(tmp_path / "empty.safetensors", "empty")
    (tmp_path / "pickled.safetensors").write_bytes(pickle.dumps({"centroids": [1.0]}, protocol=4))
    _load_error(tmp_path / "pickled.safetensors", "pickle")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 16])
    _load_error(tmp_path / "cut.safetensors", "truncated")
    save_file({"centroids": torch.zeros(4, 8)}, tmp_path / "foreign.safetensors")
    _load_error(tmp_path / "foreign.safetensors", "not written by KMeansModel.save")
    network = save_checkpoint(resnet18(width=8), tmp_path / "net.safetensors")
    _load_error(network, "network checkpoint", "load_checkpoint")

    tampered = bytearray(data)
    tampered[-1] ^= 0xFF
    path.write_bytes(bytes(tampered))
    _load_error(path, "sha256")


def test_reservoir_is_uniform_over_strata() -> None:
    sampler = ReservoirSampler(1000, seed=0)
    for stratum in range(10):  # ten strata of 5000 vectors, arriving one after another
        for _ in range(5):
            sampler.add(np.full((1000, 2), stratum, dtype=np.float32))
    sample = sampler.sample
    assert sample.shape == (1000, 2) and sampler.n_seen == 50_000
    counts = np.bincount(sample[:, 0].astype(int), minlength=10)
    chi2 = float(((counts - 100.0) ** 2 / 100.0).sum())
    assert chi2 < 27.9, counts  # chi-square, 9 degrees of freedom, p = 0.001


def test_reservoir_is_deterministic_and_chunking_free() -> None:
    x = np.random.default_rng(0).normal(size=(3000, 3)).astype(np.float32)
    whole = ReservoirSampler(200, seed=4)
    whole.add(x)
    pieces = ReservoirSampler(200, seed=4)
    for start in range(0, 3000, 170):
        pieces.add(torch.from_numpy(x[start : start + 170]))
    np.testing.assert_array_equal(whole.sample, pieces.sample)
    other = ReservoirSampler(200, seed=5)
    other.add(x)
    assert not np.array_equal(whole.sample, other.sample)
    small = ReservoirSampler(200, seed=4)
    small.add(x[:50])
    np.testing.assert_array_equal(small.sample, x[:50])  # below capacity: everything, in order


def test_stratified_sampler_gives_each_sample_its_share() -> None:
    rng = np.random.default_rng(0)
    big, small = rng.normal(size=(5000, 3)), rng.normal(size=(40, 3))
    a = StratifiedSampler(100, seed=2)
    a.add("slide_b", big[:2500])
    a.add("core_a", small)
    a.add("slide_b", big[2500:])
    b = StratifiedSampler(100, seed=2)  # other arrival order, same sample
    b.add("slide_b", big)
    b.add("core_a", small)
    assert a.sample_ids == ("core_a", "slide_b") and a.n_seen("slide_b") == 5000
    assert a.sample.shape == (140, 3)
    np.testing.assert_array_equal(a.sample, b.sample)


def test_vector_helpers() -> None:
    fmap = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    mask = np.zeros((3, 4), dtype=bool)
    mask[1, 2] = mask[2, 0] = True
    np.testing.assert_array_equal(masked_vectors(fmap, mask), [[6, 18], [8, 20]])
    assert masked_vectors(torch.from_numpy(fmap), torch.from_numpy(mask)).shape == (2, 2)
    assert masked_vectors(fmap).shape == (12, 2)
    with pytest.raises(KMeansError, match="resize the mask"):
        masked_vectors(fmap, np.ones((4, 3), dtype=bool))
    unit = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float16))
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    assert unit.dtype == np.float32


def test_per_sample_and_cohort_modes() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=(30, 30))
    fmap = np.zeros((6, 30, 30), dtype=np.float32)
    for c, ch in enumerate((0, 2, 4)):
        fmap[ch][truth == c] = rng.uniform(1, 9, size=int((truth == c).sum()))
    mask = np.ones((30, 30), dtype=bool)
    mask[:5] = False
    model = fit_per_sample(fmap, mask, k=3, n_vectors=200, seed=1, backend="torch", device="cpu")
    assert model.params.l2_normalise and model.n_vectors == 200
    # Only the direction matters after L2 normalisation: magnitudes 1-9 do not split clusters.
    assert adjusted_rand_score(truth.ravel(), model.predict(fmap).ravel()) == 1.0
    cohort = fit_cohort([("s1", fmap, mask), ("s2", fmap[:, ::-1].copy(), None)], per_sample=150)
    assert cohort.n_vectors == 300
    assert adjusted_rand_score(truth.ravel(), cohort.predict(fmap).ravel()) == 1.0


def test_bad_input_is_named() -> None:
    with pytest.raises(KMeansError, match="backend='gpu'"):
        KMeansParams(backend="gpu")
    with pytest.raises(KMeansError, match="k=0"):
        KMeansParams(k=0)
    with pytest.raises(KMeansError, match="NaN or inf"):
        fit_kmeans(
            np.array([[0.0, np.inf], [1.0, 2.0], [3.0, 4.0]]), params=KMeansParams(k=2, backend="torch")
        )
    with pytest.raises(KMeansError, match="only 2 vectors"):
        fit_kmeans(np.zeros((2, 3)), params=KMeansParams(k=3, backend="torch", device="cpu"))
    with pytest.raises(KMeansError, match=r"must be \(n, d\)"):
        fit_kmeans(np.zeros((2, 3, 4)), params=KMeansParams(k=2, backend="torch"))


def test_auto_resolves_to_torch_without_gpu() -> None:
    if _cuml_ready() is None:
        pytest.skip("this machine has cuML and a GPU: auto picks cuml")
    assert resolve_backend("auto") == "torch"
    assert resolve_backend("sklearn") == "sklearn"
    if importlib.util.find_spec("cuml") is None:
        with pytest.raises(OptionalDependencyError, match="pip install 'equislide\\[cuml\\]'"):
            fit_kmeans(np.zeros((4, 2)), params=KMeansParams(k=2, backend="cuml"))


def test_nan_and_inf_are_refused_but_large_finite_values_are_not() -> None:
    # The finiteness check sums in float32; a sum that overflows on finite values must not be refused.
    huge = np.full((6, 3), 3e38, dtype=np.float32)  # finite; their float32 sum is inf
    from equislide.models.kmeans import _prepare

    assert torch.equal(_prepare(huge, KMeansParams(k=2), []), torch.from_numpy(huge))
    for bad in (np.nan, -np.inf):
        x = huge.copy()
        x[3, 1] = bad
        with pytest.raises(KMeansError, match="NaN or inf"):
            _prepare(x, KMeansParams(k=2), [])


def test_cpu_sub_blocks_do_not_change_the_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from equislide.models import _kmeans_torch as engine

    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(5000, 16)).astype(np.float32))
    centroids = x[:5].clone()

    def one_pass(step: int = 1500):
        return (x[i : i + step] for i in range(0, x.shape[0], step))

    whole = engine._assign_pass(one_pass(), centroids)
    monkeypatch.setattr(engine, "_CPU_BLOCK_BYTES", 128 * 4 * 16)  # 128-row sub-blocks
    blocks = engine._assign_pass(one_pass(), centroids)
    again = engine._assign_pass(one_pass(), centroids)
    assert torch.equal(whole[1], blocks[1]) and whole[3] == blocks[3] == 5000
    torch.testing.assert_close(whole[0], blocks[0], rtol=1e-6, atol=1e-4)
    assert abs(whole[2] - blocks[2]) <= 1e-6 * whole[2]
    assert torch.equal(whole[4], blocks[4])  # the farthest rows
    assert torch.equal(blocks[0], again[0]) and blocks[2] == again[2]  # deterministic
