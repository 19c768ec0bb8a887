"""The baseline detectors Δ-Influence is compared with, and the two oracle bounds that frame them."""

import time
from dataclasses import asdict, dataclass
from typing import ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from delta_influence.cache import cached, content_key
from delta_influence.datasets import inputs_of, labels_of
from delta_influence.detectors.base import Detection, DetectionInput, Detector, require
from delta_influence.errors import ConfigError
from delta_influence.examples import evaluating
from delta_influence.influence import Strategy, check_factor_examples, check_trackable, compute_influence_scores
from delta_influence.models import penultimate_activations, small_cnn


@dataclass(frozen=True)
class InfluenceThreshold(Detector):
    """Raw influence (Koh and Liang, 2017, with EK-FAC as Grosse et al., 2023): flag the training samples whose score
    on the misbehaving query exceeds ``threshold`` (the Δ-Influence reference's baseline used 10), or the ``top_k``
    highest. Shares fitted factors with Δ-Influence when their settings agree (same cache folder, weights, data and
    factor sample).
    """

    threshold: float = 10.0
    top_k: Optional[int] = None  # flag the k highest scores instead of thresholding
    strategy: Strategy = "ekfac"
    train_batch_size: int = 128
    seed: int = 0
    factor_examples: Optional[int] = 2500  # the factors from a seeded sample of this many training samples; None: all
    name: str = "influence_threshold"
    needs_query: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be at least 1, or null to use the threshold.")
        check_factor_examples(self.factor_examples)

    def check_model(self, model: nn.Module) -> None:
        check_trackable(model)

    def _detect(self, inputs: DetectionInput) -> Detection:
        image, label = require(inputs.query, "the misbehaving query (an input and the attacker's label)", self.name)
        influence = compute_influence_scores(
            inputs.model, inputs.train_set, TensorDataset(image[None], torch.tensor([int(label)])), inputs.factors_dir,
            self.strategy, inputs.device, self.train_batch_size, seed=self.seed, factor_examples=self.factor_examples,
            partitions=inputs.partitions,
        )  # fmt: skip
        scores = influence.scores[0]
        if self.top_k is not None:
            flagged = scores.topk(min(self.top_k, len(scores))).indices
        else:
            flagged = torch.nonzero(scores > self.threshold).flatten()
        return Detection(self.name, flagged, scores, influence, info=influence.timings)


@dataclass(frozen=True)
class ActivationClustering(Detector):
    """Activation clustering (Chen et al., 2018): per training label, the penultimate-layer activations reduced to
    ``dims`` dimensions (PCA, as the Adversarial Robustness Toolbox's default; the paper used ICA), split by 2-means;
    the smaller cluster is flagged when it holds at most ``max_fraction`` of the label's samples (relative size)."""

    dims: int = 10
    max_fraction: float = 0.35
    seed: int = 0
    name: str = "activation_clustering"

    def __post_init__(self) -> None:
        if self.dims < 1 or not 0 < self.max_fraction < 0.5 + 1e-9:
            raise ConfigError(f"dims={self.dims} must be >= 1 and max_fraction={self.max_fraction} in (0, 0.5].")

    def _detect(self, inputs: DetectionInput) -> Detection:
        activations = penultimate_activations(inputs.model, inputs.train_set, inputs.device).numpy()
        labels = labels_of(inputs.train_set)
        scores = torch.zeros(len(labels))  # 1 - the sample's cluster's share of its label: small clusters score high
        flagged = []
        for label in labels.unique().tolist():
            members = torch.nonzero(labels == label).flatten()
            if len(members) < 4:
                continue
            points = activations[members.numpy()]
            dims = min(self.dims, points.shape[1], len(points) - 1)
            reduced = PCA(n_components=dims, random_state=self.seed).fit_transform(points)
            clusters = KMeans(n_clusters=2, n_init=10, random_state=self.seed).fit_predict(reduced)
            share = np.bincount(clusters, minlength=2) / len(clusters)
            smaller = int(share.argmin())
            scores[members] = torch.from_numpy(1 - share[clusters]).float()
            if share[smaller] <= self.max_fraction:
                flagged.append(members[torch.from_numpy(clusters == smaller)])
        flagged = torch.cat(flagged) if flagged else torch.zeros(0, dtype=torch.long)
        return Detection(self.name, flagged, scores)


@dataclass(frozen=True)
class SpectralSignatures(Detector):
    """Spectral signatures (Tran et al., 2018): per training label, the centred penultimate-layer activations are
    projected on their top singular vector; the samples with the highest squared projection, ``removal_factor``
    times ``expected_fraction`` of the label's samples (the paper's 1.5 epsilon), are flagged.

    ``expected_fraction`` is the share of poisons the defender expects within a poisoned label (epsilon)."""

    expected_fraction: float = 0.1
    removal_factor: float = 1.5
    name: str = "spectral_signatures"

    def __post_init__(self) -> None:
        if not 0 < self.expected_fraction * self.removal_factor < 1:
            raise ConfigError(
                f"expected_fraction={self.expected_fraction} times removal_factor={self.removal_factor} must lie in "
                "(0, 1): it is the share of each label that is removed."
            )

    def _detect(self, inputs: DetectionInput) -> Detection:
        activations = penultimate_activations(inputs.model, inputs.train_set, inputs.device).double()
        labels = labels_of(inputs.train_set)
        scores = torch.zeros(len(labels))
        flagged = []
        for label in labels.unique().tolist():
            members = torch.nonzero(labels == label).flatten()
            centred = activations[members] - activations[members].mean(dim=0)
            top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
            outlier = (centred @ top) ** 2
            scores[members] = outlier.float()
            count = int(self.removal_factor * self.expected_fraction * len(members))
            flagged.append(members[outlier.topk(count).indices] if count else members[:0])
        return Detection(self.name, torch.cat(flagged), scores)


@dataclass(frozen=True)
class FrequencyAnalysis(Detector):
    """Frequency analysis (Zeng et al., 2021): a small CNN on the 2-D DCT of images, trained to tell clean images
    from synthetically corrupted copies of them (random patches, additive noise, blends with noise images, smooth
    low-frequency patterns), flags the training samples it gives P(poisoned) >= ``cutoff``. It trains on the clean
    held-out set (``clean_set``: the test set) and is cached like other generated artefacts, keyed by its settings
    and those images."""

    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    max_images: int = 5000  # clean images it trains on (each also corrupted once): the first of ``clean_set``
    cutoff: float = 0.5
    seed: int = 0
    name: str = "frequency_analysis"

    def _detect(self, inputs: DetectionInput) -> Detection:
        clean_set = require(inputs.clean_set, "clean held-out images (clean_set, e.g. the test set)", self.name)
        mean = torch.as_tensor(require(inputs.mean, "the normalisation's mean", self.name)).view(-1, 1, 1)
        std = torch.as_tensor(require(inputs.std, "the normalisation's std", self.name)).view(-1, 1, 1)
        clean = _pixels(clean_set, mean, std)[: self.max_images]
        settings = {k: v for k, v in asdict(self).items() if k not in ("cutoff", "name")}
        key = content_key(settings, (clean * 255).round().to(torch.uint8))
        made = cached(inputs.factors_dir.parent / "detector_cache", "frequency_cnn", key,
                      lambda: self._train(clean, inputs.device))  # fmt: skip
        model = small_cnn(2, clean.shape[1])
        model.load_state_dict(made["state_dict"])
        suspicion = _predict(model, dct2(_pixels(inputs.train_set, mean, std)), inputs.device)
        flagged = torch.nonzero(suspicion >= self.cutoff).flatten()
        return Detection(self.name, flagged, suspicion, info={"train_s": made["train_s"], "val_acc": made["val_acc"]})

    def _train(self, clean: Tensor, device) -> dict:
        """Trains the DCT classifier on clean images (label 0) and corrupted copies (label 1); 10 % held out."""
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed)
        corrupted = corrupt(clean, generator)
        images = dct2(torch.cat([clean, corrupted]))
        labels = torch.cat([torch.zeros(len(clean)), torch.ones(len(clean))]).long()
        order = torch.randperm(len(labels), generator=generator)
        held = order[: len(order) // 10]
        train = order[len(order) // 10 :]
        torch.manual_seed(self.seed)
        model = small_cnn(2, clean.shape[1]).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        loader = DataLoader(TensorDataset(images[train], labels[train]), batch_size=self.batch_size, shuffle=True,
                            generator=generator)  # fmt: skip
        for _ in range(self.epochs):
            model.train()
            for batch, target in loader:
                loss = F.cross_entropy(model(batch.to(device)), target.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        held_acc = ((_predict(model, images[held], device) >= 0.5).long() == labels[held]).float().mean().item()
        return {"state_dict": model.cpu().state_dict(), "train_s": time.perf_counter() - start, "val_acc": held_acc}


@dataclass(frozen=True)
class Oracle(Detector):
    """Upper bound: flags exactly the true poisons (``poison_indices``)."""

    name: str = "oracle"

    def _detect(self, inputs: DetectionInput) -> Detection:
        return Detection(self.name, require(inputs.poison_indices, "the true poison indices", self.name))


@dataclass(frozen=True)
class RandomSubset(Detector):
    """Lower bound: a seeded random set of training samples, as many as the true poisons (or ``size``)."""

    size: Optional[int] = None
    seed: int = 0
    name: str = "random"

    def _detect(self, inputs: DetectionInput) -> Detection:
        size = self.size
        if size is None:
            size = len(require(inputs.poison_indices, "the true poison indices (or a size)", self.name))
        generator = torch.Generator().manual_seed(self.seed)
        return Detection(self.name, torch.randperm(len(inputs.train_set), generator=generator)[:size])


def dct2(images: Tensor) -> Tensor:
    """The orthonormal 2-D DCT-II of each channel of ``images`` ``[..., H, W]``.

    Example:
        >>> coefficients = dct2(torch.ones(1, 4, 4))
        >>> round(coefficients[0, 0, 0].item(), 4), round(coefficients.abs().sum().item(), 4)
        (4.0, 4.0)
    """
    height, width = images.shape[-2:]
    return _dct_matrix(height, images.dtype) @ images @ _dct_matrix(width, images.dtype).T


def corrupt(images: Tensor, generator: torch.Generator) -> Tensor:
    """Copies of ``images`` (floats in [0, 1], ``[N, C, H, W]``) each with one synthetic trigger: a random patch of
    random colours, additive uniform noise, a blend with a noise image, or a smooth low-frequency pattern."""
    count, channels, height, width = images.shape
    out = images.clone()
    kinds = torch.randint(4, (count,), generator=generator)
    for i in range(count):
        kind = int(kinds[i])
        if kind == 0:
            size = int(torch.randint(2, max(3, height // 6) + 1, (1,), generator=generator))
            top, left = (int(torch.randint(d - size + 1, (1,), generator=generator)) for d in (height, width))
            out[i, :, top : top + size, left : left + size] = torch.rand(channels, size, size, generator=generator)
        elif kind == 1:
            out[i] += (torch.rand(channels, height, width, generator=generator) - 0.5) * 0.1
        elif kind == 2:
            alpha = 0.1 + 0.2 * float(torch.rand((), generator=generator))
            out[i] = (1 - alpha) * out[i] + alpha * torch.rand(channels, height, width, generator=generator)
        else:
            coarse = torch.rand(1, channels, 4, 4, generator=generator) - 0.5
            out[i] += 0.2 * F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    return out.clamp(0, 1)


def _dct_matrix(size: int, dtype: torch.dtype) -> Tensor:
    """The orthonormal DCT-II matrix of order ``size``."""
    n = torch.arange(size, dtype=torch.float64)
    matrix = torch.cos(torch.pi * (n[None] + 0.5) * n[:, None] / size) * (2 / size) ** 0.5
    matrix[0] /= 2**0.5
    return matrix.to(dtype)


def _pixels(dataset, mean: Tensor, std: Tensor) -> Tensor:
    """The inputs of ``dataset`` back in [0, 1] pixel units."""
    return (inputs_of(dataset) * std + mean).clamp(0, 1)


@torch.no_grad()
def _predict(model: nn.Module, images: Tensor, device) -> Tensor:
    """P(poisoned) for each image."""
    with evaluating(model, torch.device(device)):
        return torch.cat([model(chunk.to(device)).softmax(1)[:, 1].cpu() for chunk in images.split(512)])
