"""Data for training and evaluating the metric: manifests, paired transforms, datasets, the toy set."""
from epban.data.manifest import (ManifestError, Sample, check_images, load_manifest, read_csv_manifest,
                                 read_list_file, select_split)
from epban.data.transforms import DataPolicy, PairedEvalTransform, PairedTrainTransform
from epban.data.dataset import EpochBatchSampler, PairDataset, SizeGroupedBatchSampler
from epban.data.toy import SYNTHETIC_WARNING, make_toy_dataset, pseudo_score

__all__ = [
    "ManifestError", "Sample", "check_images", "load_manifest", "read_csv_manifest", "read_list_file",
    "select_split", "DataPolicy", "PairedEvalTransform", "PairedTrainTransform", "EpochBatchSampler",
    "PairDataset", "SizeGroupedBatchSampler", "SYNTHETIC_WARNING", "make_toy_dataset", "pseudo_score",
]
