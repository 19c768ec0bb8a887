"""SCAn (Tang et al., USENIX Security 2021): a label whose features need two identities to be explained holds a
second population, the poisons."""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from delta_influence.datasets import labels_of
from delta_influence.detectors.base import Detection, DetectionInput, Detector, clean_sample
from delta_influence.errors import ConfigError
from delta_influence.models import penultimate_activations


@dataclass(frozen=True)
class SCAn(Detector):
    """Statistical contamination analysis on the penultimate-layer features.

    1. A global model, fitted by EM on the features of ``clean_images`` clean held-out images: each feature is a
       label's identity plus a variation, both Gaussian (covariances ``Su`` and ``Se``, shared by all labels).
    2. Per label, the training samples and the clean images of the label are split in two by a 2-means under the
       ``Se`` metric; the label's score ``J`` is how much better two identities explain them than one (the mean drop
       in Mahalanobis distance).
    3. The labels' scores, divided by the largest, are compared with their median in units of the median absolute
       deviation; a label above ``cutoff`` (e^2, the authors') is contaminated, and its training samples in the
       group that holds fewer of the clean images are flagged.

    One departure from the authors' code, on purpose: the one-identity fit of step 2 uses the posterior mean of the
    global model, ``Su (n Su + Se)^-1 sum x`` as in their own EM, where their test uses ``Se (n Su + Se)^-1 sum x``;
    with it, ``J`` also counts how far that estimate lies from the label's mean, which swamps the split's gain
    (docs/decisions/detectors.md measures both). Only labels scoring above the median count (one-sided).
    """

    clean_images: int = 2000  # backdoor-toolbox's clean budget on CIFAR-10 (the first 2,000 test images)
    cutoff: float = math.e**2
    iterations: int = 100  # at most, of the EM and of each 2-means (the authors')
    em_tolerance: float = 1e-5  # the EM stops when the covariances move less (Frobenius norms, summed)
    seed: int = 0
    name: str = "scan"

    def __post_init__(self) -> None:
        if self.clean_images < 2 or self.iterations < 1 or self.cutoff <= 0:
            raise ConfigError(
                f"clean_images={self.clean_images} must be at least 2, iterations={self.iterations} at least 1 and "
                f"cutoff={self.cutoff} positive."
            )

    def _detect(self, inputs: DetectionInput) -> Detection:
        clean = clean_sample(inputs, self.clean_images, self.seed, self.name)
        features = penultimate_activations(inputs.model, inputs.train_set, inputs.device).double()
        clean_features = penultimate_activations(inputs.model, clean, inputs.device).double()
        labels, clean_labels = labels_of(inputs.train_set), labels_of(clean)
        identity, variation = self.global_model(clean_features, clean_labels)
        metric = torch.linalg.pinv(variation)
        everything = torch.cat([features, clean_features])
        everything = everything - everything.mean(dim=0)
        every_label = torch.cat([labels, clean_labels])
        is_clean = torch.arange(len(everything)) >= len(features)
        generator = torch.Generator().manual_seed(self.seed)
        classes = labels.unique().tolist()
        scores, groups = [], {}
        for label in classes:
            members = torch.nonzero(every_label == label).flatten()
            group = _two_means(everything[members], metric, generator, self.iterations)
            scores.append(_split_gain(everything[members], group, identity, variation, metric))
            groups[label] = (members, group)
        anomaly = anomaly_index(torch.tensor(scores))
        suspicion = torch.zeros(len(features))
        flagged = []
        for label, index in zip(classes, anomaly.tolist()):
            members, group = groups[label]
            train = ~is_clean[members]
            suspicion[members[train]] = index
            if index > self.cutoff:  # the group with fewer clean images is the poisons'
                poisoned = int((group & is_clean[members]).sum() < (~group & is_clean[members]).sum())
                flagged.append(members[train & (group == bool(poisoned))])
        flagged = torch.cat(flagged) if flagged else torch.zeros(0, dtype=torch.long)
        info = {f"anomaly_index_{label}": value for label, value in zip(classes, anomaly.tolist())}
        return Detection(self.name, flagged, suspicion, info=info)

    def global_model(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """EM for the covariances of the labels' identities (``Su``) and of the variation around them (``Se``)."""
        features = features - features.mean(dim=0)
        classes = labels.unique()
        means = torch.stack([features[labels == label].mean(dim=0) for label in classes])
        position = torch.searchsorted(classes, labels)
        identity, variation = torch.cov(means[position].T), torch.cov((features - means[position]).T)
        for _ in range(self.iterations):
            precision = torch.linalg.pinv(variation)
            for k, label in enumerate(classes):
                rows = features[labels == label]
                # the posterior mean of the identity: Se (n Su + Se)^-1 Su Se^-1 sum x = Su (n Su + Se)^-1 sum x
                means[k] = (
                    variation @ torch.linalg.pinv(len(rows) * identity + variation) @ identity @ precision @ rows.sum(0)
                )
            new_identity, new_variation = torch.cov(means[position].T), torch.cov((features - means[position]).T)
            change = (new_identity - identity).norm() + (new_variation - variation).norm()
            identity, variation = new_identity, new_variation
            if change <= self.em_tolerance:
                break
        return identity, variation


def anomaly_index(scores: Tensor) -> Tensor:
    """Each score, divided by the largest, above the median in units of 1.4826 median absolute deviations (0 at or
    below the median).

    Example:
        >>> [round(value, 1) for value in anomaly_index(torch.tensor([1.0, 1.1, 0.9, 1.0, 5.0])).tolist()]
        [0.0, 0.7, 0.0, 0.0, 27.0]
    """
    scaled = scores / scores.max()
    middle = scaled.quantile(0.5)  # of an even count: the mean of the two middle values, as numpy's median
    spread = 1.4826 * (scaled - middle).abs().quantile(0.5)
    return ((scaled - middle) / spread.clamp_min(1e-12)).clamp_min(0)


def _two_means(rows: Tensor, metric: Tensor, generator: torch.Generator, iterations: int) -> Tensor:
    """Two groups of ``rows`` by 2-means under the Mahalanobis ``metric``, from a seeded random split: ``True`` for
    the first group."""
    group = torch.rand(len(rows), generator=generator, dtype=torch.float64) >= 0.5
    for _ in range(iterations):
        if group.all() or not group.any():
            group[0] = not group[0]
        first, second = rows[group].mean(dim=0), rows[~group].mean(dim=0)
        closer = first @ metric @ first - second @ metric @ second - 2 * rows @ metric @ (first - second) < 0
        if torch.equal(closer, group) or torch.equal(closer, ~group):
            break
        group = closer
    if group.all() or not group.any():  # two groups, however small
        group[0] = not group[0]
    return group


def _split_gain(rows: Tensor, group: Tensor, identity: Tensor, variation: Tensor, metric: Tensor) -> float:
    """The mean drop in Mahalanobis distance from one identity (the global model's posterior mean) to the two
    groups' own means."""
    one = identity @ torch.linalg.pinv(len(rows) * identity + variation) @ rows.sum(dim=0)
    two = torch.where(group[:, None], rows[group].mean(dim=0), rows[~group].mean(dim=0))

    def distance(centres: Tensor) -> Tensor:
        return ((rows - centres) @ metric * (rows - centres)).sum(dim=1)

    return float((distance(one[None]) - distance(two)).mean())
