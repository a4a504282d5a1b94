"""FID and KID of generated images against reference features, computed by torchmetrics.

torchmetrics 1.9's ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` take any ``nn.Module``
as ``feature`` (its ``num_features`` attribute skips their dummy forward; ``normalize`` is then
ignored, the images go to the module unchanged). difflab extracts features once per image set and
hands torchmetrics a :class:`PrecomputedFeatures` identity: the feature network runs once for both
metrics, reference features come from the on-disk cache, and under DDP ranks gather (N, d)
features rather than images. FID's state is the float64 sums sum(phi) and sum(phi phi^T), so it
does not depend on how the images were batched.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
# from their modules: torchmetrics.image exports them only when torch-fidelity (which needs torchvision) is installed
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from difflab.metrics.features import FeatureExtractor, extract_features


class PrecomputedFeatures(nn.Identity):
    """The ``feature`` module given to torchmetrics: its inputs already are features (N, num_features)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


def capped_subset_size(requested: int, num_generated: int, num_reference: int) -> int:
    """The KID subset size: ``requested``, capped at the smaller of the two sample counts.

    torchmetrics draws each subset without replacement and fails when a set is smaller than the
    subset; with the cap, a set smaller than ``requested`` is used whole in every subset (kid_std
    then only reflects the other set's draws, or is 0 when both are used whole).
    """
    if requested <= 0:
        raise ValueError(f"kid_subset_size must be a positive integer, got {requested}")
    return min(requested, num_generated, num_reference)


def fid_kid(
    generated: Tensor, reference: Tensor, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """FID and KID between generated (N, d) and reference (M, d) features: {fid, kid_mean, kid_std, kid_subset_size}.

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) (Heusel et al. 2017); KID = the
    unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
    ``kid_subsets`` random subsets (Binkowski et al. 2018). The KID subsets are drawn from ``seed``,
    so the same features give the same KID. Both sets need at least 2 samples.
    """
    if generated.shape[0] < 2 or reference.shape[0] < 2:
        raise ValueError(
            f"FID and KID need at least 2 generated and 2 reference samples, "
            f"got {generated.shape[0]} and {reference.shape[0]}"
        )
    if generated.shape[1] != reference.shape[1]:
        raise ValueError(f"generated features are {generated.shape[1]}-d but reference features {reference.shape[1]}-d")
    generated, reference = generated.double().cpu(), reference.double().cpu()
    identity = PrecomputedFeatures(generated.shape[1])
    # sync_on_compute=False: under DDP only rank 0 computes, on features every rank already gathered
    fid = FrechetInceptionDistance(feature=identity, sync_on_compute=False)
    fid.update(reference, real=True)
    fid.update(generated, real=False)
    size = capped_subset_size(kid_subset_size, generated.shape[0], reference.shape[0])
    with warnings.catch_warnings():  # its warning that it keeps all features: (N, d) is what we hold anyway
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        kid = KernelInceptionDistance(feature=identity, subsets=kid_subsets, subset_size=size, sync_on_compute=False)
    kid.update(reference, real=True)
    kid.update(generated, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": size,
    }


def sample_quality(
    images: Tensor,
    reference: Tensor,
    features: FeatureExtractor,
    batch_size: int = 64,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """FID / KID of generated images (N, C, H, W) in [-1, 1] against reference features (M, d) of ``features``.

    ``reference`` comes from :func:`difflab.metrics.reference_features` with the same extractor.
    """
    generated = extract_features(features, images, batch_size)
    return fid_kid(generated, reference, kid_subsets, kid_subset_size, seed)
