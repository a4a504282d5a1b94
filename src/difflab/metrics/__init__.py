"""Sample-quality metrics: feature networks, cached real-data reference features, FID and KID (torchmetrics)."""

from difflab.metrics.features import (
    ClassifierFeatures,
    FeatureExtractor,
    InceptionFeatures,
    classifier_accuracy,
    extract_features,
    find_inception_weights,
)
from difflab.metrics.quality import fid_kid, sample_quality
from difflab.metrics.reference import (
    ReferenceCache,
    dataset_description,
    reference_features,
    reference_images,
    reference_manifest,
)

__all__ = [
    "ClassifierFeatures",
    "FeatureExtractor",
    "InceptionFeatures",
    "ReferenceCache",
    "classifier_accuracy",
    "dataset_description",
    "extract_features",
    "fid_kid",
    "find_inception_weights",
    "reference_features",
    "reference_images",
    "reference_manifest",
    "sample_quality",
]
