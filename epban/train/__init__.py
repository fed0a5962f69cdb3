"""Training and evaluating the metric: ``make_toy_dataset``, ``train_metric``, ``evaluate_metric``.

The same three are the ``epban make-dataset``, ``epban train-metric`` and ``epban eval-metric``
commands (``epban/train/cli.py``).
"""
from epban.data.toy import make_toy_dataset
from epban.train.evaluate import evaluate_metric
from epban.train.trainer import TrainingInterrupted, train_metric

__all__ = ["make_toy_dataset", "train_metric", "evaluate_metric", "TrainingInterrupted"]
