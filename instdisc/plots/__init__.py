"""Pictures of training: curves of runs' metrics.jsonl and 2-D maps of features. Needs the ``[plot]`` extra
(matplotlib; scikit-learn for t-SNE), imported only when a picture is drawn."""
from .curves import PANELS, Panel, RunSeries, Series, curves_size, draw_curves, panels_for, plot_runs, run_series
from .embedding import MAP_SIZE, draw_embedding, embedding_map, pca, tsne_2d
from .metrics import read_metrics

__all__ = ["MAP_SIZE", "PANELS", "Panel", "RunSeries", "Series", "curves_size", "draw_curves", "draw_embedding",
           "embedding_map", "panels_for", "pca", "plot_runs", "read_metrics", "run_series", "tsne_2d"]
