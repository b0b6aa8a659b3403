"""Clusters of user vectors: people grouped by taste as the model sees it, named by their tags."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd


log = logging.getLogger(__name__)


# clusters


def cluster_users(vectors: np.ndarray, n_clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (FAISS) of user vectors: people grouped by the direction of their taste.

    Vectors are L2-normalised first and centroids kept on the unit sphere, so the clustering uses
    cosine similarity, the same geometry as the inner-product scores the model is trained for,
    without letting vector length (how active a user is) dominate the grouping.

    Args:
        vectors: (U, D) user vectors.
        n_clusters: wanted number of clusters; reduced to U when there are fewer users.
        seed: FAISS k-means seed (same seed and input => same labels).

    Returns:
        labels (U,) int64 in 0..k-1 and centroids (k, D) float32 (unit length).
    """
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"vectors must be a non-empty (U, D) array, got shape {x.shape}")
    k = max(1, min(int(n_clusters), len(x)))
    if k < n_clusters:
        log.warning("cluster_users: %d clusters asked for %d users; using %d", n_clusters, len(x), k)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=int(seed), spherical=True, verbose=False,
                      max_points_per_centroid=100_000)
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64), np.asarray(km.centroids, dtype=np.float32)


def label_clusters(profiles: pd.DataFrame, n_labels: int = 3, min_share: float = 0.05) -> dict[int, list[str]]:
    """For each cluster, the tags most over-represented in it: lift = share in cluster / share overall.

    A tag must be held by at least ``min_share`` of the cluster's users (and two of them) to count,
    so that one user's rare tag cannot top the list with an enormous lift. Users need ``cluster``
    (negative = no cluster) and ``tags`` columns.
    """
    p = profiles[profiles["cluster"] >= 0][["cluster", "tags"]]
    if not len(p):
        return {}
    sizes = p["cluster"].value_counts()
    held = p.explode("tags").dropna(subset=["tags"]).reset_index().drop_duplicates(["index", "tags"])  # (user, tag) once
    if not len(held):
        return {int(c): [] for c in sizes.index}
    in_cluster = held.groupby(["cluster", "tags"]).size().rename("n").reset_index()
    overall = held["tags"].value_counts() / len(p)
    in_cluster["share"] = in_cluster["n"] / in_cluster["cluster"].map(sizes).to_numpy()
    in_cluster["lift"] = in_cluster["share"] / in_cluster["tags"].map(overall).to_numpy()
    ok = (in_cluster["share"] >= min_share) & (in_cluster["n"] >= 2)
    ranked = in_cluster[ok].sort_values(["cluster", "lift", "n", "tags"], ascending=[True, False, False, True])
    top = ranked.groupby("cluster").head(n_labels).groupby("cluster")["tags"].agg(list)
    return {int(c): [str(t) for t in top.get(c, [])] for c in sorted(sizes.index)}


# ----------------------------------------------------------------------------------------------
