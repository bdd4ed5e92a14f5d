"""kNN evaluation and retrieval on feature arrays (numpy + FAISS).

Modules: `search` (indexes and chunked cosine search; tests/test_knn_search.py), `metrics` (pure vote and
retrieval metrics; tests/test_knn_metrics.py), `evaluate` (kNN classification / retrieval reports;
tests/test_knn_evaluate.py). FAISS is imported only when an index is built.
"""
from .evaluate import check_knn_args, knn_evaluate, retrieval_evaluate
from .metrics import (UNLABELED, average_precisions, encode_labels, knn_classify, majority_vote_predict, map_at_r,
                      mean_average_precision, recall_at_k, relevant_counts, weighted_knn_predict)
from .search import INDEX_KINDS, KnnIndex, build_index, iter_search, prepare_features, search

__all__ = [
    "INDEX_KINDS",
    "KnnIndex",
    "UNLABELED",
    "average_precisions",
    "build_index",
    "check_knn_args",
    "encode_labels",
    "iter_search",
    "knn_classify",
    "knn_evaluate",
    "majority_vote_predict",
    "map_at_r",
    "mean_average_precision",
    "prepare_features",
    "recall_at_k",
    "relevant_counts",
    "retrieval_evaluate",
    "search",
    "weighted_knn_predict",
]
