"""Smooth Trigger (Zeng et al., 2021, "Rethinking the backdoor attacks' triggers: a frequency perspective"): a
low-frequency trigger made from a surrogate's targeted universal adversarial perturbation."""

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from tqdm.auto import tqdm

from delta_influence.attacks.base import AttackContext, LabeledImages, Trigger, TriggerAttack
from delta_influence.cache import cached, content_key
from delta_influence.errors import ConfigError
from delta_influence.surrogate import SurrogateRecipe, train_surrogate


@dataclass(frozen=True)
class SmoothTrigger(TriggerAttack):
    """Dirty-label backdoor with a smooth, low-frequency additive trigger.

    The trigger is a targeted universal adversarial perturbation of a surrogate (trained on the clean training set)
    toward ``target``, as in the reference code: passes over ``num_images`` clean training images add the targeted
    DeepFool steps of the images the perturbation does not yet send to the target, low-pass filtered with a Gaussian
    of ``sigma`` pixels, then filter the sum again and min-max scale it into [0, ``magnitude``]; until
    ``fooling_rate`` of the images go to the target or after ``max_passes`` passes (the best pass is kept). Poisons
    are victim-class training images plus the trigger (clipped to [0, 1], stored as 8-bit), relabelled ``target``.
    The trigger is cached under the data module's cache folder, keyed by everything that made it.

    The default is the reference's CIFAR-100 setting: 125 telephones (86) relabelled as roads (68).

    Args:
        victim: Class whose training samples are poisoned (index or name).
        target: Label the poisons get and the trigger pushes toward (index or name).
        num_poisons: Number of poisons.
        magnitude: The trigger's range in [0, 1] pixel units.
        sigma: Standard deviation (pixels) of the Gaussian low-pass filter.
        num_images: Clean training images (of classes other than the target) the perturbation is built from.
        fooling_rate: Stop once this share of them is classified as the target.
        max_passes: Stop after this many passes over them.
        overshoot: DeepFool's overshoot.
        surrogate: How the surrogate is trained.
        seed: Seed of the surrogate, the images and their order.
        trigger_path: A precomputed trigger (``.npy`` or ``.pt`` array, ``[C, H, W]`` or ``[H, W, C]``, added in
            [0, 1] pixel units) used instead of generating one.
    """

    victim: int | str = 86  # CIFAR-100: telephone
    target: int | str = 68  # CIFAR-100: road
    num_poisons: int = 125
    magnitude: float = 0.2
    sigma: float = 6.0
    num_images: int = 200
    fooling_rate: float = 0.5
    max_passes: int = 10
    overshoot: float = 0.02
    surrogate: SurrogateRecipe = field(default_factory=SurrogateRecipe)
    seed: int = 0
    trigger_path: Optional[str] = None

    def __post_init__(self) -> None:
        if not 0 < self.magnitude <= 1:
            raise ConfigError(f"attack.magnitude={self.magnitude} must lie in (0, 1]: it is a pixel-intensity range.")
        if self.sigma <= 0 or self.num_images < 1 or self.max_passes < 1:
            raise ConfigError(
                f"attack.sigma={self.sigma}, num_images={self.num_images}, max_passes={self.max_passes}: need "
                "sigma > 0, num_images >= 1 and max_passes >= 1."
            )
        if not 0 < self.fooling_rate <= 1:
            raise ConfigError(f"attack.fooling_rate={self.fooling_rate} must lie in (0, 1].")

    def make_trigger(self, train: LabeledImages, context: AttackContext) -> Trigger:
        if self.trigger_path:
            pattern, info = self._load(train), {}
        else:
            made = self._generated(train, context)
            pattern = made["trigger"]
            info = {k: made[k] for k in ("fooling_rate", "surrogate_s", "trigger_s")}

        def trigger(images: Tensor) -> Tensor:
            return (images + pattern).clamp(0, 1)

        return Trigger(trigger, media={"trigger": _min_max(pattern, 1.0)}, info=info)  # stretched for showing

    def _generated(self, train: LabeledImages, context: AttackContext) -> dict:
        """The cached trigger for this training set and these settings, generated when absent."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("victim", "num_poisons", "trigger_path")}
        settings["num_classes"] = context.num_classes
        key = content_key(settings, train.images, train.labels)
        return cached(context.cache_dir, "smooth_trigger", key, lambda: self._generate(train, context))

    def _generate(self, train: LabeledImages, context: AttackContext) -> dict:
        start = time.perf_counter()
        model = train_surrogate(
            train.images, train.labels, context.num_classes, self.surrogate, self.seed, context.device
        )  # fmt: skip
        trained = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed)
        candidates = torch.nonzero(train.labels != self.target).flatten()
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[: self.num_images]]
        images = train.images[chosen].float().div(255).to(context.device)
        pattern, rate = universal_perturbation(
            model, images, self.target, self.sigma, self.magnitude, self.fooling_rate, self.max_passes,
            self.overshoot, generator,
        )  # fmt: skip
        timings = {"surrogate_s": trained - start, "trigger_s": time.perf_counter() - trained}
        return {"trigger": pattern.cpu(), "fooling_rate": rate, **timings}

    def _load(self, train: LabeledImages) -> Tensor:
        """The precomputed trigger file, in CHW layout, checked against the images' shape."""
        path = Path(self.trigger_path)
        if not path.is_file():
            raise ConfigError(f"attack.trigger_path={self.trigger_path!r} is not a file.")
        array = torch.load(path, map_location="cpu") if path.suffix == ".pt" else torch.from_numpy(np.load(path))
        array = torch.as_tensor(array, dtype=torch.float32)
        shape = tuple(train.images.shape[1:])
        if tuple(array.shape) == shape:
            return array
        if array.dim() == 3 and tuple(array.permute(2, 0, 1).shape) == shape:
            return array.permute(2, 0, 1).contiguous()
        raise ConfigError(
            f"attack.trigger_path={self.trigger_path!r} holds an array of shape {tuple(array.shape)}; the images are "
            f"{shape} (channels, height, width), so give [C, H, W] or [H, W, C] of that size."
        )


def low_pass(image: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of ``[C, H, W]`` with standard deviation ``sigma`` pixels (kernel of 3 sigma each side)."""
    size = min(2 * math.ceil(3 * sigma) + 1, 2 * (min(image.shape[-2:]) // 2) - 1)
    return TF.gaussian_blur(image[None], [size, size], [sigma, sigma])[0]


def targeted_deepfool(
    model: nn.Module, images: Tensor, target: int, overshoot: float = 0.02, max_steps: int = 20
) -> Tensor:
    """Per-image small perturbations that move each of ``images`` (in [0, 1]) to class ``target``: batched targeted
    DeepFool, linearising the gap between the target's logit and the predicted class's logit at each step."""
    total = torch.zeros_like(images)
    for _ in range(max_steps):
        inputs = (images + (1 + overshoot) * total).clamp(0, 1).requires_grad_(True)
        logits = model(inputs)
        predicted = logits.argmax(1)
        active = predicted != target
        if not active.any():
            break
        gap = logits[:, target] - logits.gather(1, predicted[:, None]).squeeze(1)  # < 0 where not yet the target
        (gradient,) = torch.autograd.grad(gap.sum(), inputs)  # samples are independent in eval mode
        norms = gradient.flatten(1).pow(2).sum(1).clamp_min(1e-12)
        step = (gap.detach().abs() + 1e-4) / norms
        total = total + (step * active).view(-1, 1, 1, 1) * gradient
    return (1 + overshoot) * total


def universal_perturbation(
    model: nn.Module,
    images: Tensor,
    target: int,
    sigma: float,
    magnitude: float,
    fooling_rate: float,
    max_passes: int,
    overshoot: float,
    generator: torch.Generator,
    batch_size: int = 16,
) -> tuple[Tensor, float]:
    """A smooth targeted universal perturbation ``[C, H, W]`` with values in [0, ``magnitude``].

    Each pass goes over ``images`` in batches; the targeted DeepFool steps of the images not yet sent to ``target``
    are low-pass filtered and added, and the sum is filtered again and min-max scaled into [0, ``magnitude``] (the
    reference's update, batched). Stops when ``fooling_rate`` of the images go to ``target`` or after ``max_passes``
    passes; returns the perturbation of the best pass with its fooling rate.
    """
    perturbation = torch.zeros_like(images[0])
    best, best_rate = perturbation, -1.0
    with tqdm(range(max_passes), desc="Smooth trigger", leave=False) as passes:
        for _ in passes:
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                inputs = (images[batch.to(images.device)] + perturbation).clamp(0, 1)
                with torch.no_grad():
                    unfooled = model(inputs).argmax(1) != target
                if unfooled.any():
                    steps = targeted_deepfool(model, inputs[unfooled], target, overshoot)
                    perturbation = _min_max(low_pass(perturbation + low_pass(steps.sum(0), sigma), sigma), magnitude)
            with torch.no_grad():
                hits = [model((chunk + perturbation).clamp(0, 1)).argmax(1) == target for chunk in images.split(256)]
            rate = torch.cat(hits).float().mean().item()
            if rate > best_rate:
                best, best_rate = perturbation, rate
            passes.set_postfix(fooling_rate=f"{rate:.2f}")
            if rate >= fooling_rate:
                break
    return best, best_rate


def _min_max(image: Tensor, magnitude: float) -> Tensor:
    """``image`` scaled into [0, ``magnitude``]."""
    return (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12) * magnitude
