"""A small plain-torch trainer for the surrogate models that some attacks need, seeded and deterministic on CPU."""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from delta_influence.cache import cached, content_key
from delta_influence.errors import ConfigError
from delta_influence.models import build_model
from delta_influence.training import check_optimizer, flip_and_shift, make_optimizer, scheduled_epochs


@dataclass(frozen=True)
class SurrogateRecipe:
    """How a surrogate is trained; part of the cache key of everything made with it. The settings mean what the
    classifier's (``model.*``), trainer's (``max_epochs``) and data module's (``batch_size``, ``flip``,
    ``crop_padding``) options of the same name mean; the optimiser and schedule are built by the classifier's own
    code and the augmentation draws the data module's distribution (``delta_influence.training``), so a recipe copied
    from a run (``PoisonClassifier.recipe``) trains as that run does."""

    arch: str = "small_cnn"  # an architecture of delta_influence.models
    epochs: int = 10
    optimizer: str = "sgd"  # "sgd" (momentum, nesterov) or "adamw"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: Optional[tuple[float, ...]] = None  # lr x lr_gamma at these epochs (or fractions); None: one-cycle
    lr_gamma: float = 0.1
    batch_size: int = 128
    flip: bool = True  # random horizontal flips
    crop_padding: int = 0  # random crops after this many pixels of zero padding; 0: none

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.crop_padding < 0:
            raise ConfigError(
                f"surrogate recipe epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}, crop_padding="
                f"{self.crop_padding}: need epochs >= 1, batch_size >= 1, lr > 0 and crop_padding >= 0."
            )
        check_optimizer(self.optimizer, "surrogate recipe optimizer")
        if self.milestones is not None:
            object.__setattr__(self, "milestones", tuple(self.milestones))
            scheduled_epochs(self.milestones, self.epochs)  # refuses milestones the classifier would refuse

    def as_dict(self) -> dict:
        return asdict(self)


class Normalized(nn.Module):
    """A classifier that takes images in [0, 1] pixel space and normalises them itself."""

    def __init__(self, model: nn.Module, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.view(1, -1, 1, 1).clone())
        self.register_buffer("std", std.view(1, -1, 1, 1).clone())

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images - self.mean) / self.std)


def train_surrogate(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    recipe: SurrogateRecipe,
    seed: int = 0,
    device: str = "cpu",
    stop_after: Optional[int] = None,
) -> Normalized:
    """Trains ``recipe.arch`` on uint8 ``images`` ``[N, C, H, W]``; returns it in eval mode, taking [0, 1] pixels.

    ``seed`` fixes the initial weights, the order of the batches and the augmentation's draws; ``stop_after`` ends
    the training after that many epochs of the recipe's schedule (an early snapshot of the same run). The global
    random state is left untouched; the same inputs and seed give the same model on the CPU.
    """
    pixels = images.float() / 255
    flat = pixels.transpose(0, 1).reshape(pixels.shape[1], -1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Normalized(build_model(recipe.arch, num_classes, images.shape[1]), flat.mean(1), flat.std(1)).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(
        model.parameters(), recipe.optimizer, recipe.lr, recipe.momentum, recipe.nesterov, recipe.weight_decay
    )
    per_epoch = -(-len(labels) // recipe.batch_size)
    if recipe.milestones is None:
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=recipe.epochs * per_epoch,
                                                       pct_start=0.2)  # fmt: skip
    else:  # stepped once per epoch, as Lightning steps the classifier's
        milestones = scheduled_epochs(recipe.milestones, recipe.epochs)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=recipe.lr_gamma)
    epochs = recipe.epochs if stop_after is None else min(stop_after, recipe.epochs)
    model.train()
    with tqdm(total=epochs * per_epoch, desc="Training the surrogate", leave=False) as progress:
        for _ in range(epochs):
            for batch in torch.randperm(len(labels), generator=generator).split(recipe.batch_size):
                inputs = flip_and_shift(pixels[batch], generator, recipe.flip, recipe.crop_padding)
                loss = F.cross_entropy(model(inputs.to(device)), labels[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if recipe.milestones is None:
                    schedule.step()
                progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                progress.update()
            if recipe.milestones is not None:
                schedule.step()
    return model.eval()


def cached_surrogate(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    recipe: SurrogateRecipe,
    seed: int,
    device: str,
    cache_dir: Path,
    stop_after: Optional[int] = None,
) -> tuple[Normalized, float]:
    """``train_surrogate``'s model, cached under ``cache_dir`` keyed by the data, the recipe and the seed, so that
    attacks sharing a surrogate (several brews on one training set) train it once; returns it with the seconds its
    training took when it was made."""
    settings = {**recipe.as_dict(), "seed": seed, "num_classes": num_classes}
    if stop_after is not None and stop_after < recipe.epochs:
        settings["stop_after"] = stop_after

    def make() -> dict:
        start = time.perf_counter()
        model = train_surrogate(images, labels, num_classes, recipe, seed, device, stop_after)
        return {
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "seconds": time.perf_counter() - start,
        }

    made = cached(cache_dir, "surrogate", content_key(settings, images, labels), make)
    model = Normalized(build_model(recipe.arch, num_classes, images.shape[1]), torch.zeros(images.shape[1]),
                       torch.ones(images.shape[1]))  # fmt: skip
    model.load_state_dict(made["state_dict"])
    return model.to(device).eval(), made["seconds"]
