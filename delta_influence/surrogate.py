"""A small plain-torch trainer for the surrogate models that some attacks need, seeded and deterministic on CPU."""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from delta_influence.cache import cached, content_key
from delta_influence.errors import ConfigError
from delta_influence.models import build_model


@dataclass(frozen=True)
class SurrogateRecipe:
    """How a surrogate is trained; part of the cache key of everything made with it."""

    arch: str = "small_cnn"  # an architecture of delta_influence.models
    epochs: int = 10
    lr: float = 0.05  # SGD, momentum 0.9, Nesterov, cosine decay to 0
    batch_size: int = 128
    weight_decay: float = 5e-4
    flip: bool = True  # random horizontal flips

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(
                f"surrogate recipe epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}: need epochs >= 1, "
                "batch_size >= 1 and lr > 0."
            )

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
    images: Tensor, labels: Tensor, num_classes: int, recipe: SurrogateRecipe, seed: int = 0, device: str = "cpu"
) -> Normalized:
    """Trains ``recipe.arch`` on uint8 ``images`` ``[N, C, H, W]``; returns it in eval mode, taking [0, 1] pixels.

    The global random state is left untouched; the same inputs and seed give the same model on the CPU.
    """
    pixels = images.float() / 255
    flat = pixels.transpose(0, 1).reshape(pixels.shape[1], -1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Normalized(build_model(recipe.arch, num_classes, images.shape[1]), flat.mean(1), flat.std(1)).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
    )
    steps = recipe.epochs * -(-len(labels) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=steps, pct_start=0.2)
    model.train()
    with tqdm(total=steps, desc="Training the surrogate", leave=False) as progress:
        for _ in range(recipe.epochs):
            for batch in torch.randperm(len(labels), generator=generator).split(recipe.batch_size):
                inputs = pixels[batch]
                if recipe.flip:
                    flip = torch.rand(len(batch), generator=generator) < 0.5
                    inputs = torch.where(flip.view(-1, 1, 1, 1), inputs.flip(-1), inputs)
                loss = F.cross_entropy(model(inputs.to(device)), labels[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                progress.update()
    return model.eval()


def cached_surrogate(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    recipe: SurrogateRecipe,
    seed: int,
    device: str,
    cache_dir: Path,
) -> tuple[Normalized, float]:
    """``train_surrogate``'s model, cached under ``cache_dir`` keyed by the data, the recipe and the seed, so that
    attacks sharing a surrogate (several brews on one training set) train it once; returns it with the seconds its
    training took when it was made."""
    settings = {**recipe.as_dict(), "seed": seed, "num_classes": num_classes}

    def make() -> dict:
        start = time.perf_counter()
        model = train_surrogate(images, labels, num_classes, recipe, seed, device)
        return {
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "seconds": time.perf_counter() - start,
        }

    made = cached(cache_dir, "surrogate", content_key(settings, images, labels), make)
    model = Normalized(build_model(recipe.arch, num_classes, images.shape[1]), torch.zeros(images.shape[1]),
                       torch.ones(images.shape[1]))  # fmt: skip
    model.load_state_dict(made["state_dict"])
    return model.to(device).eval(), made["seconds"]
