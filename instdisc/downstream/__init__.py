"""Transfer: train new predictors on a learned encoder.

Module map (tests: tests/test_downstream_<module>.py):
  linear.py    linear_probe / fit_linear: frozen encoder, features once, softmax regression on them
  finetune.py  finetune / load_finetuned: encoder + linear layer trained end to end with labels
"""
from .finetune import FinetunedClassifier, FinetuneResult, finetune, load_finetuned
from .linear import LinearClassifier, LinearProbeResult, fit_linear, linear_probe, topk_accuracy

__all__ = ["FinetuneResult", "FinetunedClassifier", "LinearClassifier", "LinearProbeResult", "finetune",
           "fit_linear", "linear_probe", "load_finetuned", "topk_accuracy"]
