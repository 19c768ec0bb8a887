"""ASSET (Pan et al., USENIX Security 2023): a model trained to be unsure on clean data and wrong on what looks
unlike it; the poisons are the samples it gets most wrong."""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from delta_influence.datasets import inputs_of, labels_of
from delta_influence.detectors.base import Detection, DetectionInput, Detector, clean_sample
from delta_influence.errors import ConfigError
from delta_influence.models import penultimate_activations
from delta_influence.quiet import interactive


@dataclass(frozen=True)
class ASSET(Detector):
    """ASSET's offset training, as the authors' demo does it for supervised CIFAR-10.

    A fresh copy of the victim's architecture is trained for ``steps`` steps. Each step draws ``batch_size``
    training samples and as many of the ``clean_images`` clean held-out images (the base set), then:
    1. pushes the model's logits on the base batch towards flat (minimises their variance; Adam, ``lr``);
    2. trains a new small network (two hidden layers of 128) for ``inner_steps`` steps to tell the training batch's
       features (1) from the base batch's (0): the features are the victim's penultimate activations;
    3. takes the training samples whose output is an outlier (adjusted outlyingness above ``outlyingness``, a
       skew-aware boxplot rule) and maximises the model's cross-entropy on them (Adam, ``lr``).
    The model's cross-entropy on every training sample is its score; a Gaussian fitted to the lower half of the
    scores sets the cut where its density falls to ``eps``, and the samples above it are flagged.

    The authors' demo runs one pass over 50,000 images at batches of 512 (98 steps); ``steps`` keeps that number
    whatever the training set's size. Costs about two epochs' worth of training at 10,000 images.
    """

    steps: int = 98
    inner_steps: int = 100
    lr: float = 1e-4
    batch_size: int = 512
    clean_images: int = 1000  # the authors': 100 per class of CIFAR-10's test set
    outlyingness: float = 2.0
    eps: float = 1e-6
    seed: int = 0
    name: str = "asset"

    def __post_init__(self) -> None:
        if min(self.steps, self.inner_steps, self.batch_size, self.clean_images) < 1 or self.lr <= 0:
            raise ConfigError(
                f"steps={self.steps}, inner_steps={self.inner_steps}, batch_size={self.batch_size} and clean_images="
                f"{self.clean_images} must be at least 1, lr={self.lr} positive."
            )
        if not 0 < self.eps < 1:
            raise ConfigError(f"eps={self.eps} must lie in (0, 1): the clean scores' density at the cut.")

    def _detect(self, inputs: DetectionInput) -> Detection:
        device = torch.device(inputs.device)
        base = clean_sample(inputs, self.clean_images, self.seed, self.name)
        train_images, train_labels = inputs_of(inputs.train_set), labels_of(inputs.train_set)
        base_images = inputs_of(base)
        train_features = penultimate_activations(inputs.model, inputs.train_set, device)
        base_features = penultimate_activations(inputs.model, base, device)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = _fresh(inputs.model).to(device)
        minimise = torch.optim.Adam(model.parameters(), lr=self.lr)
        maximise = torch.optim.Adam(model.parameters(), lr=self.lr)
        order = torch.zeros(0, dtype=torch.long)
        selected = 0
        model.train()
        for _ in tqdm(range(self.steps), desc=f"{self.name}: offset steps", leave=False, disable=not interactive()):
            if len(order) < self.batch_size:  # a new pass over the training set, shuffled
                order = torch.cat([order, torch.randperm(len(train_labels), generator=generator)])
            batch, order = order[: self.batch_size], order[self.batch_size :]
            drawn = torch.randperm(len(base_images), generator=generator)[: self.batch_size]
            flat = model(base_images[drawn].to(device)).var(dim=1).mean()
            minimise.zero_grad()
            flat.backward()
            minimise.step()
            outputs = self.separate(train_features[batch], base_features[drawn], generator)
            outliers = batch[adjusted_outlyingness(outputs) > self.outlyingness]
            if len(outliers):  # the demo's step is undefined without any (the mean of no losses)
                selected += len(outliers)
                loss = -F.cross_entropy(model(train_images[outliers].to(device)), train_labels[outliers].to(device))
                maximise.zero_grad()
                loss.backward()
                maximise.step()
        model.eval()
        with torch.no_grad():
            losses = torch.cat([
                F.cross_entropy(model(images.to(device)), labels.to(device), reduction="none").cpu()
                for images, labels in zip(train_images.split(1024), train_labels.split(1024))
            ])  # fmt: skip
        cut = gaussian_cut(losses, self.eps)
        flagged = torch.nonzero(losses > cut).flatten()
        return Detection(self.name, flagged, losses, info={"cut": cut, "selected": float(selected)})

    def separate(self, suspect: Tensor, clean: Tensor, generator: torch.Generator) -> Tensor:
        """A new small network trained to output 1 on ``suspect`` features and 0 on ``clean`` ones: its outputs on
        ``suspect``."""
        width = suspect.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            net = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
        optimizer = torch.optim.Adam(net.parameters(), lr=self.lr)
        for _ in range(self.inner_steps):
            for features, target in ((suspect, 1.0), (clean, 0.0)):
                loss = (torch.sigmoid(net(features)) - target).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            return torch.sigmoid(net(suspect)).flatten()


def medcouple(values: Tensor) -> float:
    """The medcouple (Brys et al., 2004), a robust measure of skewness in [-1, 1]: the median of the kernel
    ``((x_i - m) - (m - x_j)) / (x_i - x_j)`` over the pairs with ``x_i >= m >= x_j``.

    Example:
        >>> medcouple(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
        0.0
        >>> growing = torch.tensor([1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0])  # a long right tail
        >>> round(medcouple(growing), 3), round(medcouple(-growing), 3)
        (0.488, -0.488)
    """
    values = values.double().sort().values
    middle = values.median() if len(values) % 2 else values[len(values) // 2 - 1 : len(values) // 2 + 1].mean()
    upper, lower = values[values >= middle], values[values <= middle]
    above, below = upper[:, None] - middle, middle - lower[None, :]
    spread = above + below
    # pairs of values both at the median score 0 (exact for one such value; the data here are continuous)
    kernel = torch.where(spread > 0, (above - below) / spread.clamp_min(1e-300), torch.zeros_like(spread))
    return float(torch.quantile(kernel.flatten(), 0.5))  # the mean of the two middle values for an even count


def adjusted_outlyingness(values: Tensor) -> Tensor:
    """Each value's distance from the median over the distance from the median to the skew-adjusted boxplot's whisker
    on its side (Hubert and Van der Veeken, 2008): above 1 lies outside the whisker.

    Example:
        >>> scores = adjusted_outlyingness(torch.tensor([1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 30.0]))
        >>> [round(float(s), 2) for s in scores[[3, 6]]]
        [0.0, 9.0]
    """
    values = values.double()
    q1, middle, q3 = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75], dtype=values.dtype))
    skew, iqr = medcouple(values), q3 - q1
    low, high = (-4, 3) if skew >= 0 else (-3, 4)
    lower = q1 - 1.5 * math.exp(low * skew) * iqr
    upper = q3 + 1.5 * math.exp(high * skew) * iqr
    above = (values - middle) / (upper - middle).clamp_min(1e-12)
    below = (middle - values) / (middle - lower).clamp_min(1e-12)
    return torch.where(values >= middle, above, below).float()


def gaussian_cut(scores: Tensor, eps: float) -> float:
    """Where a Gaussian fitted to the lower half of ``scores`` has density ``eps``, above its mean (its mean when
    the density never falls that low).

    Example:
        >>> scores = torch.cat([torch.randn(1000, generator=torch.Generator().manual_seed(0)), torch.full((10,), 9.0)])
        >>> 2.0 < gaussian_cut(scores, 1e-6) < 9.0
        True
    """
    scores = scores.double()
    lower = scores[scores <= scores.median()]
    mean = lower.mean()
    std = lower.std().clamp_min(1e-12)
    room = -2 * math.log(eps * float(std) * math.sqrt(2 * math.pi))
    return float(mean + std * math.sqrt(room)) if room > 0 else float(mean)


def _fresh(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every layer's parameters drawn anew."""
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh
