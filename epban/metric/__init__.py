"""Training and evaluating the metric: ``make_toy_dataset``, ``train_metric``, ``evaluate_metric``.

    trainer    ``train_metric``: the authors' recipe on scored SR/HR pairs, resumable, DDP under torchrun
    evaluate   ``evaluate_metric``: SRCC/KRCC/PLCC/RMSE of a metric on a manifest split, with a scatter plot
    cli        the ``epban make-dataset``, ``epban train-metric`` and ``epban eval-metric`` commands
"""
from epban.data.toy import make_toy_dataset
from epban.metric.evaluate import evaluate_metric
from epban.metric.trainer import TrainingInterrupted, train_metric

__all__ = ["make_toy_dataset", "train_metric", "evaluate_metric", "TrainingInterrupted"]
