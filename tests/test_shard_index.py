"""shard_index: build, tune, search, save and load one shard, on small clustered synthetic vectors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lookalike.index import shard_index
from lookalike.index.params import RERANK_K, IndexParams, choose_params

DIM = 64
MODEL = "efficientnet-lite0@test"


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def clustered(n: int, seed: int, *, clusters: int = 100, dim: int = DIM) -> np.ndarray:
    """Unit vectors in gaussian clusters whose spread, like real embeddings', lives in a few directions."""
    rng = np.random.default_rng(1000 + clusters)  # the same clusters for every seed: fresh queries match
    scale = (1.0 + np.arange(dim)) ** -0.5 * np.sqrt(dim / np.sum(1.0 / (1.0 + np.arange(dim))))
    centres = rng.standard_normal((clusters, dim)) * scale
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spreads = rng.uniform(0.3, 1.0, clusters)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, clusters, n)
    x = centres[which] + rng.standard_normal((n, dim)) * scale * (spreads[which, None] / np.sqrt(dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(20_000, seed=1)


@pytest.fixture(scope="module")
def built(vectors: np.ndarray) -> shard_index.BuiltIndex:
    # These tests are about IVF-PQ itself; at 20,000 x 64-d exact search may well be faster (tested below).
    return shard_index.build(vectors, choose_params(len(vectors), DIM, flat_below=0), seed=7, exact_fallback=False)


@pytest.fixture(scope="module")
def saved(built: shard_index.BuiltIndex, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("indexes") / "run-1" / "shoes"
    shard_index.save(built, folder, ids=item_ids(built.index.ntotal), model=MODEL, extra={"shard": "shoes"})
    return folder


def item_ids(n: int) -> list[str]:
    return [f"item-{i:06d}" for i in range(n)]


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def test_ivfpq_build_reaches_target_recall(built: shard_index.BuiltIndex) -> None:
    assert built.params.kind == "ivfpq"
    assert built.index.ntotal == 20_000 and built.index.is_trained
    assert built.target_reached and built.recall_at_10 >= built.params.target_recall
    assert 1 <= built.nprobe <= built.params.nlist and built.rerank_k >= RERANK_K
    assert built.eval_queries == 1000
    assert built.build_seconds >= built.train_seconds + built.add_seconds + built.tune_seconds > 0


def test_tuning_stops_at_the_first_setting_reaching_the_target(built: shard_index.BuiltIndex) -> None:
    *before, last = built.tuning
    assert last == (built.nprobe, built.rerank_k, built.recall_at_10)
    assert all(recall < built.params.target_recall for _, _, recall in before)
    assert [nprobe for nprobe, _, _ in built.tuning][:2] == [1, 2][: len(built.tuning)]


def test_manifest_recall_matches_recall_on_fresh_queries(built: shard_index.BuiltIndex, vectors: np.ndarray) -> None:
    queries = clustered(1000, seed=2)
    _, found = shard_index.search(built.index, vectors, queries, 10, built.nprobe, built.rerank_k)
    fresh = shard_index.recall_at_k(found, exact_top(vectors, queries, 10), 10)
    assert fresh == pytest.approx(built.recall_at_10, abs=0.03)


def test_search_returns_exact_cosines_best_first(built: shard_index.BuiltIndex, vectors: np.ndarray) -> None:
    queries = clustered(50, seed=3)
    scores, ids = shard_index.search(built.index, vectors, queries, 10, built.nprobe, built.rerank_k)
    assert scores.shape == ids.shape == (50, 10) and scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", vectors[ids], queries), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_search_needs_the_vectors_to_rerank(built: shard_index.BuiltIndex, vectors: np.ndarray) -> None:
    with pytest.raises(ValueError, match="re-ranking needs the shard's vectors"):
        shard_index.search(built.index, None, vectors[:2], 10, 4, 100)
    with pytest.raises(ValueError, match=r"queries must have shape \(q, 64\)"):
        shard_index.search(built.index, vectors, vectors[:2, :32], 10, 4, 100)


def test_rerank_breaks_ties_by_id_and_pads_short_rows() -> None:
    # Items 1 and 3 are the same vector (a twin), item 0 the query's closest: the exact step must rank
    # the twins by FAISS id whatever order the proposer gave them, and pad past the 4 items there are.
    vectors = np.eye(4, DIM, dtype=np.float32)
    vectors[3] = vectors[1] = np.array([0.6, 0.8] + [0.0] * (DIM - 2), dtype=np.float32)
    proposer = faiss.IndexFlatIP(DIM)
    proposer.add(vectors[::-1].copy())  # proposer ids are reversed: ties come in the wrong order
    order = np.arange(4)[::-1]

    class Reversed:
        d, ntotal = DIM, 4

        def search(self, queries: np.ndarray, k: int, params: object = None) -> tuple[np.ndarray, np.ndarray]:
            scores, ids = proposer.search(queries, k)
            return scores, np.where(ids >= 0, order[np.maximum(ids, 0)], -1)

    query = np.zeros((1, DIM), dtype=np.float32)
    query[0, :2] = [0.8, 0.6]
    scores, ids = shard_index.search(Reversed(), vectors, query, 6, 0, 6)  # type: ignore[arg-type]
    assert ids.tolist() == [[1, 3, 0, 2, -1, -1]]
    np.testing.assert_allclose(scores[0, :4], [0.96, 0.96, 0.8, 0.0], atol=1e-6)
    assert np.isneginf(scores[0, 4:]).all()


def test_flat_shard_is_exact() -> None:
    vectors = clustered(3000, seed=4)
    params = choose_params(len(vectors), DIM)
    built = shard_index.build(vectors, params, seed=0, eval_queries=300)
    assert params.kind == "flat"
    assert (built.recall_at_10, built.nprobe, built.rerank_k, built.tuning) == (1.0, 0, 0, ())
    assert built.target_reached and built.eval_queries == 300
    queries = clustered(20, seed=5)
    _, ids = shard_index.search(built.index, None, queries, 5, 0, 0)
    np.testing.assert_array_equal(ids, exact_top(vectors, queries, 5))


def test_tiny_shard_pads_missing_neighbours() -> None:
    vectors = clustered(4, seed=6)
    built = shard_index.build(vectors, choose_params(4, DIM), seed=0)
    assert built.recall_at_10 == 1.0 and built.eval_queries == 4
    scores, ids = shard_index.search(built.index, None, vectors, 10, 0, 0)
    assert (ids[:, 4:] == -1).all() and np.isneginf(scores[:, 4:]).all()
    assert sorted(ids[0, :4]) == [0, 1, 2, 3]


def test_build_refuses_vectors_that_are_not_the_plan() -> None:
    vectors = clustered(100, seed=8)
    with pytest.raises(ValueError, match=r"shape \(100, 64\), the plan is for \(99, 64\)"):
        shard_index.build(vectors, choose_params(99, DIM))
    with pytest.raises(ValueError, match="not L2-normalised"):
        shard_index.build(vectors * 2, choose_params(100, DIM))


def test_save_writes_the_documented_files(saved: Path, built: shard_index.BuiltIndex) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["ids.parquet", "index.faiss", "manifest.json"]
    manifest = json.loads((saved / "manifest.json").read_text())
    for key in (
        "factory",
        "dim",
        "ntotal",
        "nprobe",
        "recall_at_10",
        "model",
        "build_seconds",
        "bytes",
        "kind",
        "nlist",
        "m",
        "rerank",
        "target_recall",
        "target_reached",
        "train_size",
        "eval_queries",
    ):
        assert key in manifest, key
    assert manifest["bytes"] == (saved / "index.faiss").stat().st_size
    assert manifest["bytes"] <= manifest["flat_bytes"] / 8
    assert (manifest["factory"], manifest["ntotal"], manifest["dim"]) == (built.params.factory, 20_000, DIM)
    assert (manifest["nprobe"], manifest["rerank"], manifest["rerank_k"]) == (built.nprobe, True, built.rerank_k)
    assert manifest["model"] == MODEL and manifest["shard"] == "shoes"
    assert manifest["tuning"][-1] == {
        "nprobe": built.nprobe,
        "rerank_k": built.rerank_k,
        "recall_at_10": built.recall_at_10,
    }
    ids = pq.read_table(saved / "ids.parquet")
    assert ids.column_names == ["item_id"] and ids["item_id"].to_pylist() == item_ids(20_000)


def test_estimated_bytes_match_the_file(saved: Path, built: shard_index.BuiltIndex) -> None:
    assert (saved / "index.faiss").stat().st_size == pytest.approx(built.params.estimated_bytes, rel=0.01)


def test_load_round_trip(saved: Path, built: shard_index.BuiltIndex, vectors: np.ndarray) -> None:
    shard = shard_index.load(saved, expected_dim=DIM, expected_model=MODEL)
    assert shard.index.ntotal == 20_000 and shard.item_ids.to_pylist() == item_ids(20_000)
    queries = clustered(30, seed=9)
    expected = shard_index.search(built.index, vectors, queries, 10, built.nprobe, built.rerank_k)
    for got, want in zip(shard.search(vectors, queries, 10), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    _, ids = shard.search(vectors, queries, 25)  # more neighbours: more candidates re-ranked
    assert ids.shape == (30, 25) and (ids >= 0).all()


def test_save_and_load_through_a_uri(built: shard_index.BuiltIndex, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/indexes/run-2/bags"
    manifest = shard_index.save(built, uri, ids=item_ids(20_000), model=MODEL)
    shard = shard_index.load(uri, expected_dim=DIM, expected_model=MODEL)
    assert shard.manifest == manifest and shard.index.ntotal == 20_000
    assert (tmp_path / "indexes/run-2/bags/index.faiss").stat().st_size == manifest["bytes"]


def test_load_refuses_another_model(saved: Path) -> None:
    with pytest.raises(ValueError, match=rf"{saved}: index built with model '{MODEL}', expected 'other-model'"):
        shard_index.load(saved, expected_dim=DIM, expected_model="other-model")


def test_load_refuses_another_dimension(saved: Path) -> None:
    with pytest.raises(ValueError, match=rf"{saved}: index has dimension 64, expected 1280"):
        shard_index.load(saved, expected_dim=1280, expected_model=MODEL)


def test_load_refuses_ids_that_do_not_match_the_index(saved: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shard"
    folder.mkdir()
    for name in ("index.faiss", "manifest.json"):
        (folder / name).write_bytes((saved / name).read_bytes())
    pq.write_table(pa.table({"item_id": item_ids(19_999)}), folder / "ids.parquet")
    with pytest.raises(ValueError, match=rf"{folder}: index.faiss holds 20000 vectors, ids.parquet 19999 ids"):
        shard_index.load(folder, expected_dim=DIM, expected_model=MODEL)


def test_load_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        shard_index.load(tmp_path, expected_dim=DIM, expected_model=MODEL)


def test_save_refuses_wrong_ids_and_clashing_extras(built: shard_index.BuiltIndex, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 ids for an index of 20000 vectors"):
        shard_index.save(built, tmp_path, ids=["a", "b", "c"], model=MODEL)
    with pytest.raises(ValueError, match=r"may not replace \['ntotal'\]"):
        shard_index.save(built, tmp_path, ids=pa.array(item_ids(20_000)), model=MODEL, extra={"ntotal": 1})


def test_align_reorders_table_rows_to_faiss_ids(saved: Path, vectors: np.ndarray) -> None:
    shard = shard_index.load(saved, expected_dim=DIM, expected_model=MODEL)
    order = np.random.default_rng(0).permutation(len(vectors))
    ids = np.array(item_ids(len(vectors)))
    table_ids = pa.chunked_array([ids[order[:5000]].tolist(), [*ids[order[5000:]].tolist(), "new-item"]])
    table_vectors = np.vstack([vectors[order], clustered(1, seed=10)])
    np.testing.assert_array_equal(shard.align(table_ids, table_vectors), vectors)


def test_align_refuses_changed_or_missing_vectors(saved: Path, vectors: np.ndarray) -> None:
    shard = shard_index.load(saved, expected_dim=DIM, expected_model=MODEL)
    changed = vectors.copy()
    changed[123] = clustered(1, seed=11)[0]
    with pytest.raises(ValueError, match="differ from those the index was built from"):
        shard.align(item_ids(len(vectors)), changed)
    with pytest.raises(ValueError, match="1 of the shard's 20000 item ids have no vector"):
        shard.align(item_ids(len(vectors))[1:], vectors[1:])


def exact_filtered_top(vectors: np.ndarray, queries: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    rows = np.flatnonzero(allowed)
    top = exact_top(vectors[rows], queries, min(k, rows.size))
    return np.where(top >= 0, rows[np.maximum(top, 0)], -1)


@pytest.mark.parametrize("exact_bytes", [0, shard_index.EXACT_FILTER_BYTES], ids=["index", "exact"])
@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0005])
def test_filtered_search_gives_k_allowed_results(
    saved: Path, vectors: np.ndarray, keep: float, exact_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the index (nprobe deepened, short queries finished exactly) or exactly over the allowed items:
    only allowed items, min(k, allowed) of them for every query, the true filtered neighbours."""
    monkeypatch.setattr(shard_index, "EXACT_FILTER_BYTES", exact_bytes)
    shard = shard_index.load(saved, expected_dim=DIM, expected_model=MODEL)
    allowed = np.random.default_rng(3).random(len(vectors)) < keep
    queries = clustered(200, seed=4)
    scores, ids = shard.search(vectors, queries, 10, allowed=allowed)
    expected = min(10, int(allowed.sum()))
    assert (ids[:, :expected] >= 0).all() and (ids[:, expected:] == -1).all()
    assert allowed[ids[:, :expected]].all()
    np.testing.assert_allclose(
        scores[:, :expected], np.einsum("qkd,qd->qk", vectors[ids[:, :expected]], queries), atol=1e-5
    )
    assert shard_index.recall_at_k(ids, exact_filtered_top(vectors, queries, allowed, 10), expected) >= 0.95


def test_filtered_search_with_nothing_allowed(saved: Path, vectors: np.ndarray) -> None:
    shard = shard_index.load(saved, expected_dim=DIM, expected_model=MODEL)
    scores, ids = shard.search(vectors, clustered(5, seed=5), 10, allowed=np.zeros(len(vectors), dtype=bool))
    assert (ids == -1).all() and np.isneginf(scores).all()


def test_filtered_flat_search_is_exact() -> None:
    vectors = clustered(3000, seed=6)
    flat = shard_index.build(vectors, choose_params(len(vectors), DIM), seed=1)
    allowed = np.arange(len(vectors)) % 7 == 0
    queries = clustered(50, seed=8)
    _, ids = shard_index.search(flat.index, None, queries, 10, 0, 0, allowed=allowed)
    np.testing.assert_array_equal(ids, exact_filtered_top(vectors, queries, allowed, 10))


def test_a_shard_where_ivfpq_is_slower_than_exact_search_is_built_flat(tmp_path: Path) -> None:
    """Vectors with no cluster structure: the target recall needs most lists probed and many candidates
    re-ranked, which costs more than one BLAS product over 12,000 vectors."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((12_000, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    params = choose_params(len(vectors), DIM, flat_below=0)
    built = shard_index.build(vectors, params, seed=0, eval_queries=300)
    assert params.kind == "ivfpq" and built.params.kind == "flat" and built.index.ntotal == len(vectors)
    assert (built.nprobe, built.rerank_k, built.recall_at_10) == (0, 0, 1.0) and built.tuning
    ivf, flat = built.considered
    assert ivf["factory"] == params.factory and flat["factory"] == "Flat"
    assert ivf["query_seconds"] >= flat["query_seconds"] > 0 and ivf["queries"] == flat["queries"] > 0
    # Tuning either stopped at the first setting slower than exact search, or ended there after timing.
    assert built.choice.startswith((f"flat: tuning {params.factory} stopped", f"flat: the tuned {params.factory}"))
    manifest = shard_index.save(built, tmp_path / "s", ids=item_ids(len(vectors)), model=MODEL)
    assert (manifest["kind"], manifest["choice"], manifest["considered"]) == ("flat", built.choice, [ivf, flat])
    queries = vectors[:5]
    _, ids = shard_index.search(built.index, None, queries, 5, 0, 0)
    np.testing.assert_array_equal(ids, exact_top(vectors, queries, 5))

    kept = shard_index.build(vectors, params, seed=0, eval_queries=300, exact_fallback=False)
    assert kept.params.kind == "ivfpq" and kept.choice.startswith("ivfpq (index.exact_fallback off)")


def test_pca_reduction_builds_and_is_tuned() -> None:
    vectors = clustered(12_000, seed=12)
    params = choose_params(len(vectors), DIM, flat_below=0, reduce_dim=32, rotation="pca")
    built = shard_index.build(vectors, params, seed=0, eval_queries=300, exact_fallback=False)
    assert built.params.factory.startswith("PCA32,IVF") and built.target_reached


def test_recall_at_k() -> None:
    true = np.array([[1, 2, 3], [4, 5, 6]])
    assert shard_index.recall_at_k(np.array([[3, 2, 1], [4, 9, 9]]), true, 3) == pytest.approx(4 / 6)
    assert shard_index.recall_at_k(np.array([[1, 9, 2], [7, 8, 9]]), true, 2) == pytest.approx(1 / 4)
    # Padding (-1) is never a hit, and only existing neighbours count.
    assert shard_index.recall_at_k(np.array([[1, -1, -1]]), np.array([[1, -1, -1]]), 3) == 1.0
    assert shard_index.recall_at_k(np.array([[-1, -1]]), np.array([[-1, -1]]), 2) == 1.0
    with pytest.raises(ValueError, match="rows"):
        shard_index.recall_at_k(true[:1], true, 3)


def fake_params(nlist: int, target: float = 0.95) -> IndexParams:
    return dataclasses.replace(choose_params(1_000_000, 256), nlist=nlist, target_recall=target)


def test_tune_stops_at_first_nprobe_reaching_target() -> None:
    calls: list[tuple[int, int]] = []

    def measure(nprobe: int, rerank_k: int) -> float:
        calls.append((nprobe, rerank_k))
        return {1: 0.5, 2: 0.7, 4: 0.9, 8: 0.96, 16: 0.99}[nprobe]

    tried, chosen = shard_index._tune(measure, fake_params(64))
    assert chosen == (8, RERANK_K, 0.96) and calls == [(1, 100), (2, 100), (4, 100), (8, 100)]
    assert tried[-1] == chosen


def test_tune_reranks_more_when_nprobe_stops_helping() -> None:
    def measure(nprobe: int, rerank_k: int) -> float:
        return min(0.2 * nprobe, {100: 0.85, 200: 0.92, 400: 0.97, 800: 0.99}[rerank_k])

    tried, chosen = shard_index._tune(measure, fake_params(64))
    assert chosen == (8, 400, 0.97)
    # At 100 candidates nprobe 16 adds nothing over 8, so candidates double and nprobe resumes at 8.
    assert [step[:2] for step in tried] == [
        (1, 100),
        (2, 100),
        (4, 100),
        (8, 100),
        (16, 100),
        (8, 200),
        (16, 200),
        (8, 400),
    ]


def test_tune_keeps_the_best_setting_when_the_target_is_out_of_reach() -> None:
    tried, chosen = shard_index._tune(
        lambda nprobe, rerank_k: min(0.1 * nprobe, 0.5) + rerank_k / 1e4, fake_params(16, target=0.99)
    )
    assert chosen == max(tried, key=lambda step: step[2]) and chosen[2] < 0.99
    assert chosen[1] == 800


# ---------------------------------------------------------------------------------------------- updates


def _previous(built: shard_index.BuiltIndex, folder: Path) -> shard_index.LoadedShard:
    shard_index.save(built, folder, ids=item_ids(built.index.ntotal), model=MODEL, extra={"run_id": "run-1"})
    return shard_index.load(folder, expected_dim=DIM, expected_model=MODEL, mmap=False)


def test_a_shard_that_changed_a_little_reuses_its_training(
    built: shard_index.BuiltIndex, vectors: np.ndarray, tmp_path: Path
) -> None:
    assert built.update["reused"] is False and built.update["quantization_error"] > 0
    previous = _previous(built, tmp_path / "run-1")
    # 2% of the shard replaced by new items of the same catalog: the codebooks still fit.
    changed = np.concatenate([vectors[400:], clustered(400, seed=99)])
    params = choose_params(len(changed), DIM, flat_below=0)
    assert params.factory == built.params.factory
    updated = shard_index.build(changed, params, seed=7, exact_fallback=False, previous=previous, max_drift=0.1)
    assert updated.update["reused"] is True and updated.update["trained_in"] == "run-1", updated.update
    assert abs(updated.update["drift"]) < 0.05  # sampling noise, and 2% new items
    assert updated.update["quantization_error"] == built.update["quantization_error"]
    assert updated.train_seconds < built.train_seconds / 10 and updated.index.ntotal == len(changed)
    assert updated.target_reached and updated.tuning  # tuned and measured again
    queries = clustered(50, seed=5)
    _, ids = shard_index.search(updated.index, changed, queries, 10, updated.nprobe, updated.rerank_k)
    assert shard_index.recall_at_k(ids, exact_top(changed, queries, 10), 10) >= 0.9
    manifest = shard_index.save(updated, tmp_path / "run-2", ids=item_ids(len(changed)), model=MODEL)
    assert manifest["reused_training"] is True and manifest["update"]["trained_in"] == "run-1"
    # An update of an update still measures drift against the original training, and names it.
    again = shard_index.load(tmp_path / "run-2", expected_dim=DIM, expected_model=MODEL, mmap=False)
    third = shard_index.build(changed, params, seed=7, exact_fallback=False, previous=again, max_drift=0.1)
    assert third.update["trained_in"] == "run-1"
    assert third.update["quantization_error"] == built.update["quantization_error"]


def test_drifted_vectors_retrain(built: shard_index.BuiltIndex, vectors: np.ndarray, tmp_path: Path) -> None:
    previous = _previous(built, tmp_path / "run-1")
    params = built.params
    # Half the shard new: codebooks fit their training points better than new ones, so this drifts.
    renewed = np.concatenate([vectors[10_000:], clustered(10_000, seed=98)])
    rebuilt = shard_index.build(renewed, params, seed=0, exact_fallback=False, previous=previous, max_drift=0.05)
    assert rebuilt.update["reused"] is False and rebuilt.update["drift"] > 0.05, rebuilt.update
    assert rebuilt.update["retrained_because"].startswith("drift ") and rebuilt.train_seconds > 0
    other = choose_params(12_000, DIM, flat_below=0)
    assert other.factory != params.factory
    resized = shard_index.build(vectors[:12_000], other, exact_fallback=False, previous=previous, max_drift=0.1)
    assert "this shard needs" in resized.update["retrained_because"]
    never = shard_index.build(vectors[:12_000], other, exact_fallback=False, previous=previous, max_drift=None)
    assert "retrained_because" not in never.update and never.update["reused"] is False


def test_matrices_split_ragged_rows_of_vectors() -> None:
    """Rows of any number of vectors (a user's members) as one matrix each, across chunks and after a filter
    (sliced offsets); a value count that is not whole vectors is refused."""
    rows = pa.chunked_array(
        [pa.array([[1, 2, 3, 4], [], [5, 6]], pa.list_(pa.float32())), pa.array([[7, 8]], pa.list_(pa.float32()))]
    )
    got = shard_index.matrices(rows, 2)
    assert [m.tolist() for m in got] == [[[1, 2], [3, 4]], [], [[5, 6]], [[7, 8]]]
    assert all(m.dtype == np.float32 and m.shape[1:] == (2,) for m in got)
    kept = pa.table({"v": rows}).filter(pa.array([False, False, True, True]))["v"]
    assert [m.tolist() for m in shard_index.matrices(kept, 2)] == [[[5, 6]], [[7, 8]]]
    assert shard_index.matrices(kept.slice(0, 0), 2) == []
    with pytest.raises(ValueError, match="2-dimensional"):
        shard_index.matrices(pa.chunked_array([pa.array([[1, 2, 3]], pa.list_(pa.float32()))]), 2)
