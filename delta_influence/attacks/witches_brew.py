"""Witches' Brew (Geiping et al., ICLR 2021, "Witches' Brew: Industrial Scale Data Poisoning via Gradient
Matching"): a clean-label targeted attack. Training images of the intended class, with their true labels, get small
perturbations whose training gradient points where the gradient of "classify the target as the intended class" does."""

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from delta_influence.attacks.base import (
    Attack,
    AttackContext,
    LabeledImages,
    PoisonedData,
    check_class,
    class_index,
)
from delta_influence.cache import cached, content_key
from delta_influence.errors import ConfigError
from delta_influence.surrogate import SurrogateRecipe, cached_surrogate


@dataclass(frozen=True)
class WitchesBrew(Attack):
    """Clean-label targeted poisoning by gradient matching.

    For each target test image: a surrogate (trained once on the clean training set, cached) gives the gradient of the
    loss that classifies the target as ``intended``; ``budget`` training images of class ``intended`` (drawn with
    ``seed``) get perturbations within an L-inf ball of ``eps`` 8-bit levels (images kept in [0, 1]) optimised so
    that the gradient of their training loss, with their true labels, has the highest cosine similarity with it.
    Signed Adam for ``steps`` steps (step size ``step_size * eps``, divided by 10 at 3/8, 5/8 and 7/8 of the steps),
    ``restarts`` random starts keeping the lowest loss, random flips and shifts of the poisons while brewing so that
    the effect survives the victim's augmentation. Labels stay correct. Several targets get one brew each on disjoint
    poisons. The attack is measured on the target image(s) labelled ``intended`` (success = the victim predicts it);
    they are left out of clean accuracy. Brewed poisons are cached as 8-bit images, keyed by everything that made them.

    The default is the paper's CIFAR-10 setting: 1 % budget, eps 16, 250 steps, 8 restarts.

    Args:
        target: Test index (or indices) of the target image(s); with ``target_class``, positions among the test
            images of that class (0: its first).
        intended: The class the attacker wants the target(s) classified as (index or name); the poisons are drawn
            from it.
        target_class: Optional class (index or name) the ``target`` positions count within.
        budget: Poisons per target: a fraction of the training set when below 1, else a count.
        eps: Largest change of a pixel, in 8-bit levels (16 = 16/255).
        steps: Optimisation steps of each restart.
        restarts: Random restarts; the perturbation with the lowest final loss is kept.
        step_size: Adam's learning rate as a fraction of ``eps``.
        batch_size: Poisons per forward pass (the gradient is accumulated over all poisons each step).
        augment: Random horizontal flips and shifts of up to 1/8 of the image size while brewing.
        surrogate: How the surrogate is trained.
        seed: Seed of the surrogate, the choice of poisons and the brew.
    """

    target: int | tuple[int, ...] = 0
    intended: int | str = 5  # CIFAR-10: dog
    target_class: Optional[int | str] = None
    budget: float = 0.01
    eps: float = 16.0
    steps: int = 250
    restarts: int = 8
    step_size: float = 0.1
    batch_size: int = 512
    augment: bool = True
    surrogate: SurrogateRecipe = field(default_factory=SurrogateRecipe)
    seed: int = 0

    def __post_init__(self) -> None:
        targets = (self.target,) if isinstance(self.target, int) else tuple(self.target)
        object.__setattr__(self, "target", targets)
        if not targets:
            raise ConfigError("attack.target is empty: give the test index of at least one target image.")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"attack.target={list(targets)} names an image twice; give each target once.")
        if self.budget <= 0 or (self.budget >= 1 and self.budget != int(self.budget)):
            raise ConfigError(
                f"attack.budget={self.budget}: give a fraction of the training set in (0, 1) or a whole number of "
                "poisons."
            )
        if not 0 < self.eps <= 255:
            raise ConfigError(f"attack.eps={self.eps} must lie in (0, 255]: it is in 8-bit levels (16 = 16/255).")
        if self.steps < 1 or self.restarts < 1 or self.batch_size < 1 or self.step_size <= 0:
            raise ConfigError(
                f"attack.steps={self.steps}, restarts={self.restarts}, batch_size={self.batch_size}, "
                f"step_size={self.step_size}: need steps, restarts and batch_size >= 1 and step_size > 0."
            )

    def with_classes(self, classes: Sequence[str]) -> "WitchesBrew":
        target_class = self.target_class
        if target_class is not None:
            target_class = class_index(target_class, classes, "attack.target_class")
        return replace(self, intended=class_index(self.intended, classes, "attack.intended"), target_class=target_class)

    def check(self, num_classes: int) -> None:
        for name in ("intended", "target_class"):
            check_class(getattr(self, name), num_classes, f"attack.{name}")
        if self.target_class == self.intended and not isinstance(self.intended, str):
            raise ConfigError(
                f"attack.target_class and attack.intended are both {self.intended}: the target must be an image of "
                "another class than the one the attacker wants it classified as."
            )

    def prepare(self, train: LabeledImages, test: LabeledImages, context: AttackContext) -> None:
        self._brews(train, test, self.target_indices(test), context)

    def poison(
        self, train: LabeledImages, test: LabeledImages, generator: torch.Generator, context: AttackContext
    ) -> PoisonedData:
        targets = self.target_indices(test)
        images = train.images.clone()
        info: dict[str, float] = {}
        brews = self._brews(train, test, targets, context)
        for position, brew in enumerate(brews):
            images[brew["indices"]] = brew["images"]
            suffix = "" if len(targets) == 1 else f"_{position}"
            info |= {f"{key}{suffix}": brew[key] for key in ("loss", "brew_s", "surrogate_s", "surrogate_p_intended")}
        indices = torch.cat([brew["indices"] for brew in brews]).sort().values
        attack_test = LabeledImages(test.images[targets], torch.full((len(targets),), int(self.intended)))
        clean_test = torch.ones(len(test.labels), dtype=torch.bool)
        clean_test[targets] = False
        changed = (images[indices].float() - train.images[indices].float()).abs().amax(dim=(1, 2, 3))
        media = {"target": test.images[targets[0]].float() / 255,
                 "perturbation": _shown(images[indices[0]].float() - train.images[indices[0]].float())}  # fmt: skip
        info["max_change"] = float(changed.max())
        return PoisonedData(LabeledImages(images, train.labels.clone()), indices, attack_test, clean_test, media, info)

    def target_indices(self, test: LabeledImages) -> Tensor:
        """The targets' indices in the test set; a position outside it, or a target already of the intended class,
        is refused."""
        if self.target_class is None:
            members, what = torch.arange(len(test.labels)), "test images"
        else:
            members = torch.nonzero(test.labels == self.target_class).flatten()
            what = f"test images of class {self.target_class}"
        for position in self.target:
            if not 0 <= position < len(members):
                raise ConfigError(
                    f"attack.target={position} is out of range: there are {len(members)} {what}, so use "
                    f"0..{len(members) - 1}."
                )
        indices = members[list(self.target)]
        for position, index in zip(self.target, indices.tolist()):
            if int(test.labels[index]) == self.intended:
                raise ConfigError(
                    f"attack.target={position} (test image {index}) is already of the intended class {self.intended}; "
                    "choose a target of another class or another attack.intended."
                )
        return indices

    def poison_count(self, num_train: int) -> int:
        """Poisons per target: the budget as a count."""
        return int(self.budget) if self.budget >= 1 else max(1, round(self.budget * num_train))

    def _brews(self, train: LabeledImages, test: LabeledImages, targets: Tensor, context: AttackContext) -> list[dict]:
        """One brew per target (test indices ``targets``; cached): the poisons' indices, their brewed 8-bit images,
        the final loss, times."""
        count = self.poison_count(len(train.labels))
        candidates = torch.nonzero(train.labels == self.intended).flatten()
        if count * len(targets) > len(candidates):
            raise ConfigError(
                f"attack.budget={self.budget} means {count} poisons per target ({count * len(targets)} for "
                f"{len(targets)} targets), more than the {len(candidates)} training images of the intended class "
                f"{self.intended}; lower attack.budget or raise data.per_class."
            )
        order = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(self.seed))]
        settings = {k: v for k, v in asdict(self).items() if k not in ("target", "target_class", "budget")}
        settings["num_classes"] = context.num_classes
        brews = []
        for position, target in enumerate(targets.tolist()):
            indices = order[position * count : (position + 1) * count].sort().values
            key = content_key(settings, train.images, train.labels, test.images[target], indices)
            brews.append(cached(context.cache_dir, "witches_brew", key,
                                lambda: self._brew(train, test.images[target], indices, context)))  # fmt: skip
        return brews

    def _brew(self, train: LabeledImages, target: Tensor, indices: Tensor, context: AttackContext) -> dict:
        model, surrogate_s = cached_surrogate(
            train.images, train.labels, context.num_classes, self.surrogate, self.seed, context.device,
            context.cache_dir,
        )  # fmt: skip
        pixels = target.float().div(255)[None].to(context.device)
        with torch.no_grad():
            p_intended = float(model(pixels).softmax(1)[0, int(self.intended)])
        start = time.perf_counter()
        delta, loss = brew(
            model, pixels, int(self.intended), train.images[indices].float().div(255).to(context.device),
            train.labels[indices].to(context.device), self.eps / 255, self.steps, self.restarts, self.step_size,
            self.batch_size, self.augment, torch.Generator().manual_seed(self.seed),
        )  # fmt: skip
        brewed = (train.images[indices].float() + delta.cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        return {"indices": indices, "images": brewed, "loss": loss, "brew_s": time.perf_counter() - start,
                "surrogate_s": surrogate_s, "surrogate_p_intended": p_intended}  # fmt: skip


def brew(
    model: nn.Module,
    target: Tensor,
    intended: int,
    poisons: Tensor,
    labels: Tensor,
    eps: float,
    steps: int,
    restarts: int,
    step_size: float = 0.1,
    batch_size: int = 512,
    augment: bool = True,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, float]:
    """Perturbations ``[P, C, H, W]`` (``|delta| <= eps``, ``poisons + delta`` in [0, 1]) whose training gradient on
    ``model`` (eval mode) matches, by cosine similarity, the gradient of classifying ``target`` (``[T, C, H, W]`` in
    [0, 1]) as ``intended``; returns the best restart's perturbations and their final loss (1 - cosine similarity,
    averaged over batches).
    """
    generator = generator or torch.Generator()
    params = [p for p in model.parameters() if p.requires_grad]
    wanted = torch.full((len(target),), intended, device=target.device)
    target_grad = torch.autograd.grad(F.cross_entropy(model(target), wanted), params)
    target_norm = torch.sqrt(sum(g.pow(2).sum() for g in target_grad))
    best, best_loss = None, math.inf
    milestones = [round(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    with tqdm(total=steps * restarts, desc="Brewing poisons", leave=False) as progress:
        for restart in range(restarts):
            start = (torch.rand(poisons.shape, generator=generator) * 2 - 1).to(poisons.device) * eps
            delta = ((poisons + start).clamp(0, 1) - poisons).requires_grad_(True)
            optimizer = torch.optim.Adam([delta], lr=step_size * eps)
            schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                losses = []
                for batch in torch.arange(len(poisons)).split(batch_size):
                    inputs = poisons[batch] + delta[batch]
                    if augment:
                        inputs = _flip_and_shift(inputs, generator)
                    grad = torch.autograd.grad(F.cross_entropy(model(inputs), labels[batch]), params, create_graph=True)
                    dot = sum((g * t).sum() for g, t in zip(grad, target_grad))
                    norm = torch.sqrt(sum(g.pow(2).sum() for g in grad))
                    loss = 1 - dot / (norm * target_norm)
                    loss.backward()
                    losses.append(loss.item())
                delta.grad.sign_()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    delta.copy_((poisons + delta.clamp(-eps, eps)).clamp(0, 1) - poisons)
                final = sum(losses) / len(losses)
                progress.set_postfix(restart=f"{restart + 1}/{restarts}", loss=f"{final:.3f}", refresh=False)
                progress.update()
            if final < best_loss:
                best, best_loss = delta.detach().clone(), final
    return best, best_loss


def _flip_and_shift(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image flipped horizontally with probability 1/2 and shifted by whole pixels, up to 1/8 of its size each
    way (zeros come in): differentiable in the images."""
    count, _, height, width = images.shape
    flip = (torch.rand(count, generator=generator) < 0.5).to(images.device)
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    reach = max(1, height // 8)
    shifts = torch.randint(-reach, reach + 1, (count, 2), generator=generator).float().to(images.device)
    theta = torch.zeros(count, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 2 * shifts[:, 0] / width
    theta[:, 1, 2] = 2 * shifts[:, 1] / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _shown(difference: Tensor) -> Tensor:
    """A perturbation in 8-bit levels ``[C, H, W]`` stretched into [0, 1] around grey, for a picture."""
    return (0.5 + difference / (2 * difference.abs().max().clamp_min(1))).clamp(0, 1)
