"""Cognitive Distillation (Huang et al., ICLR 2023): the smallest input pattern a model needs for its answer."""

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from delta_influence.detectors.base import Detection, DetectionInput, Detector, clean_sample, require
from delta_influence.errors import ConfigError
from delta_influence.examples import evaluating
from delta_influence.quiet import interactive


@dataclass(frozen=True)
class CognitiveDistillation(Detector):
    """Cognitive Distillation: for every training image, the mask that keeps the model's logits while the rest of
    the image is replaced by a random flat colour, made small (L1) and smooth (total variation) by Adam. A backdoor
    trigger is a shortcut: the model needs few pixels of a poisoned image, so its mask's L1 norm is small.

    The settings are the authors' CIFAR-10 defaults (``steps``, ``lr``, ``gamma`` on the mask's L1 norm, the paper's
    alpha; ``beta`` on its total variation; a one-channel mask on [0, 1] pixels). The authors report threshold-free
    AUROC; to flag a set, the masks of ``clean_images`` clean held-out images give the mean and spread of a clean
    norm, and a training sample is flagged when its norm lies more than ``cutoff`` of those standard deviations below
    that mean (their detection script's rule, 0.5, with held-out instead of known-clean training images).

    Costs ``steps`` forward and backward passes over the training set (100 by default: about 100 epochs' worth of
    gradient computation, without the optimiser's updates of the weights).
    """

    steps: int = 100
    lr: float = 0.1
    gamma: float = 0.01  # weight of the mask's L1 norm
    beta: float = 1.0  # weight of the mask's total variation
    cutoff: float = 0.5  # clean standard deviations below the clean mean norm
    clean_images: int = 500
    batch_size: int = 256
    seed: int = 0
    name: str = "cognitive_distillation"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.gamma < 0 or self.beta < 0 or self.clean_images < 2:
            raise ConfigError(
                f"steps={self.steps} and clean_images={self.clean_images} must be at least 1 and 2, lr={self.lr} "
                f"positive, gamma={self.gamma} and beta={self.beta} not negative."
            )

    def _detect(self, inputs: DetectionInput) -> Detection:
        mean = require(inputs.mean, "the normalisation's mean (masks are made on [0, 1] pixels)", self.name)
        std = require(inputs.std, "the normalisation's std (masks are made on [0, 1] pixels)", self.name)
        clean = clean_sample(inputs, self.clean_images, self.seed, self.name)
        reference = self.mask_norms(inputs.model, clean, mean, std, inputs.device)
        norms = self.mask_norms(inputs.model, inputs.train_set, mean, std, inputs.device)
        suspicion = (reference.mean() - norms) / reference.std()  # clean standard deviations below the clean mean
        flagged = torch.nonzero(suspicion > self.cutoff).flatten()
        info = {"clean_mask_norm": float(reference.mean()), "clean_mask_norm_std": float(reference.std())}
        return Detection(self.name, flagged, suspicion, info=info)

    def mask_norms(
        self, model: nn.Module, dataset: Dataset, mean: Sequence[float], std: Sequence[float], device
    ) -> Tensor:
        """The L1 norm of each image's distilled mask (0 to height x width)."""
        device = torch.device(device)
        mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        norms = []
        frozen = [parameter for parameter in model.parameters() if parameter.requires_grad]
        for parameter in frozen:  # gradients for the masks only
            parameter.requires_grad_(False)
        try:
            with evaluating(model, device):
                batches = DataLoader(dataset, batch_size=self.batch_size)
                for images, _ in tqdm(batches, desc=f"{self.name}: masks", leave=False, disable=not interactive()):
                    pixels = (images.to(device) * std + mean).clamp(0, 1)
                    mask = self.distil(model, pixels, lambda x: (x - mean) / std, generator)
                    norms.append(mask.abs().sum(dim=(1, 2, 3)).cpu())
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
        return torch.cat(norms)

    def distil(self, model: nn.Module, pixels: Tensor, normalise, generator: torch.Generator) -> Tensor:
        """The masks ``[B, 1, H, W]`` in [0, 1] of a batch of images in [0, 1] pixels."""
        with torch.no_grad():
            target = model(normalise(pixels))
        count, channels = pixels.shape[:2]
        variable = torch.ones(count, 1, *pixels.shape[2:], device=pixels.device, requires_grad=True)
        optimizer = torch.optim.Adam([variable], lr=self.lr, betas=(0.1, 0.1))
        for _ in range(self.steps):
            mask = (torch.tanh(variable) + 1) / 2
            colour = torch.rand(count, channels, 1, 1, generator=generator, device=pixels.device)
            mixed = pixels * mask + (1 - mask) * colour
            fit = (model(normalise(mixed)) - target).abs().mean(dim=1)
            loss = fit + self.gamma * mask.abs().sum(dim=(1, 2, 3)) + self.beta * total_variation(mask)
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
        return ((torch.tanh(variable) + 1) / 2).detach()


def total_variation(mask: Tensor) -> Tensor:
    """Each mask's squared differences between neighbouring pixels, per element of the mask.

    Example:
        >>> total_variation(torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])).tolist()
        [0.5]
    """
    vertical = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).pow(2).sum(dim=(1, 2, 3))
    horizontal = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).pow(2).sum(dim=(1, 2, 3))
    return (vertical + horizontal) / mask[0].numel()
