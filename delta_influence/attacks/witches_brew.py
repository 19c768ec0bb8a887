"""Witches' Brew (Geiping et al., ICLR 2021, "Witches' Brew: Industrial Scale Data Poisoning via Gradient
Matching"): a clean-label targeted attack. Training images of the intended class, with their true labels, get small
perturbations whose training gradient points where the gradient of "classify the target as the intended class" does."""

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional, Sequence

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
from delta_influence.surrogate import SurrogateRecipe, cached_surrogate, train_surrogate
from delta_influence.training import flip_and_shift


@dataclass(frozen=True)
class WitchesBrew(Attack):
    """Clean-label targeted poisoning by gradient matching.

    For each target test image: ``ensemble`` surrogates (trained once on the clean training set, from seeds ``seed``,
    ``seed + 1``, ..., cached) give the gradient of the loss that classifies the target as ``intended``; ``budget``
    training images of class ``intended`` (drawn with ``seed``) get perturbations within an L-inf ball of ``eps``
    8-bit levels (images kept in [0, 1], so eps 16 is 16/255 of the pixel range) optimised so that the gradient of
    their training loss, with their true labels, has the highest cosine similarity with it (summed over the
    surrogates, each with its own target gradient). Signed Adam for ``steps`` steps (step size ``step_size * eps``,
    divided by 10 at 3/8, 5/8 and 7/8 of the steps), ``restarts`` random starts keeping the lowest loss; the poisons
    are augmented while brewing as the victim's data pipeline augments them, so that the effect survives it. Labels
    stay correct. Several targets get one brew each on disjoint poisons. The attack is measured on the target
    image(s) labelled ``intended`` (success = the victim predicts it); they are left out of clean accuracy. Brewed
    poisons are cached as 8-bit images, keyed by everything that made them.

    The surrogates are trained as the victim will be (``surrogate: victim``, the default: ``train.py`` fills in the
    run's architecture, optimiser, schedule, epochs, batch size and augmentation), as the reference implementation
    does; an explicit ``SurrogateRecipe`` trains them otherwise. The other defaults are the paper's CIFAR-10 setting:
    1 % budget, eps 16, 250 steps, 8 restarts.

    Args:
        target: Test index (or indices) of the target image(s); with ``target_class``, positions among the test
            images of that class (0: its first).
        intended: The class the attacker wants the target(s) classified as (index or name); the poisons are drawn
            from it.
        target_class: Optional class (index or name) the ``target`` positions count within.
        budget: Poisons per target: a fraction of the training set when below 1, else a count.
        eps: Largest change of a pixel, in 8-bit levels (16 = 16/255 of the [0, 1] pixel range).
        steps: Optimisation steps of each restart.
        restarts: Random restarts; the perturbation with the lowest final loss is kept.
        step_size: Adam's learning rate as a fraction of ``eps``.
        batch_size: Poisons per forward pass (the gradient is accumulated over all poisons each step).
        augment: Augmentation of the poisons while brewing: ``null`` (default) the surrogate recipe's (flips, shifts
            up to its ``crop_padding``: the victim's, with ``surrogate: victim``), ``true`` flips and shifts of up to
            1/8 of the image size, ``false`` none.
        surrogate: ``victim`` (the run's own recipe) or a ``SurrogateRecipe``.
        ensemble: Surrogates brewed against at once (seeds ``seed`` to ``seed + ensemble - 1``).
        stagger: Surrogate ``k`` of ``K`` stops after ``(k + 1) / K`` of the recipe's epochs (snapshots along the
            same schedule) instead of all surrogates training to the end.
        seed: Seed of the first surrogate, the choice of poisons and the brew.
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
    augment: Optional[bool] = None
    surrogate: SurrogateRecipe | Literal["victim"] = "victim"
    ensemble: int = 1
    stagger: bool = False
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
        if self.steps < 1 or self.restarts < 1 or self.batch_size < 1 or self.step_size <= 0 or self.ensemble < 1:
            raise ConfigError(
                f"attack.steps={self.steps}, restarts={self.restarts}, batch_size={self.batch_size}, "
                f"ensemble={self.ensemble}, step_size={self.step_size}: need steps, restarts, batch_size and ensemble "
                ">= 1 and step_size > 0."
            )
        if self.surrogate != "victim" and not isinstance(self.surrogate, SurrogateRecipe):
            raise ConfigError(
                f"attack.surrogate={self.surrogate!r}: use 'victim' (trained as the run's model) or a surrogate recipe."
            )

    def with_victim_recipe(self, recipe: SurrogateRecipe) -> "WitchesBrew":
        return replace(self, surrogate=recipe) if self.surrogate == "victim" else self

    def recipe(self) -> SurrogateRecipe:
        """The surrogates' recipe; ``victim`` not yet replaced by the run's (``with_victim_recipe``) is refused."""
        if self.surrogate == "victim":
            raise ConfigError(
                "attack.surrogate='victim' trains the surrogates as the victim, but no victim recipe was given: "
                "train.py fills it in from the model, trainer and data settings; elsewhere call "
                "attack.with_victim_recipe(classifier.recipe(max_epochs, batch_size, flip, crop_padding)) or give "
                "attack.surrogate a SurrogateRecipe."
            )
        return self.surrogate

    def surrogates(self, train: LabeledImages, context: AttackContext) -> tuple[list[nn.Module], float]:
        """The ensemble's surrogates, trained on the clean ``train`` set once and cached, with the seconds their
        training took when they were made."""
        recipe, models, seconds = self.recipe(), [], 0.0
        for k in range(self.ensemble):
            stop_after = math.ceil(recipe.epochs * (k + 1) / self.ensemble) if self.stagger else None
            model, made_in = cached_surrogate(
                train.images, train.labels, context.num_classes, recipe, self.seed + k, context.device,
                context.cache_dir, stop_after,
            )  # fmt: skip
            models.append(model)
            seconds += made_in
        return models, seconds

    def known_init_victim(self, train: LabeledImages, context: AttackContext) -> nn.Module:
        """A victim trained on the poisoned ``train`` set from the first surrogate's initial weights and data order,
        with its recipe (the "known init" setting): differs from that surrogate by the poisons alone, so it checks
        the brew (its objective, eps, the poisons reaching the data) without depending on transfer."""
        return train_surrogate(train.images, train.labels, context.num_classes, self.recipe(), self.seed,
                               context.device)  # fmt: skip

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

    def poison_sets(self, labels: Tensor, num_targets: int) -> list[Tensor]:
        """The sorted training indices each of ``num_targets`` targets gets as poisons (disjoint images of the
        intended class drawn with ``seed``), from the training ``labels``."""
        count = self.poison_count(len(labels))
        candidates = torch.nonzero(labels == self.intended).flatten()
        if count * num_targets > len(candidates):
            raise ConfigError(
                f"attack.budget={self.budget} means {count} poisons per target ({count * num_targets} for "
                f"{num_targets} targets), more than the {len(candidates)} training images of the intended class "
                f"{self.intended}; lower attack.budget or raise data.per_class."
            )
        order = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(self.seed))]
        return [order[k * count : (k + 1) * count].sort().values for k in range(num_targets)]

    def _brews(self, train: LabeledImages, test: LabeledImages, targets: Tensor, context: AttackContext) -> list[dict]:
        """One brew per target (test indices ``targets``; cached): the poisons' indices, their brewed 8-bit images,
        the final loss, times."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("target", "target_class", "budget")}
        settings["num_classes"] = context.num_classes
        brews = []
        for target, indices in zip(targets.tolist(), self.poison_sets(train.labels, len(targets))):
            key = content_key(settings, train.images, train.labels, test.images[target], indices)
            brews.append(cached(context.cache_dir, "witches_brew", key,
                                lambda: self._brew(train, test.images[target], indices, context)))  # fmt: skip
        return brews

    def _brew(self, train: LabeledImages, target: Tensor, indices: Tensor, context: AttackContext) -> dict:
        models, surrogate_s = self.surrogates(train, context)
        pixels = target.float().div(255)[None].to(context.device)
        with torch.no_grad():
            p_intended = sum(float(model(pixels).softmax(1)[0, int(self.intended)]) for model in models) / len(models)
        recipe = self.recipe()
        if self.augment is None:
            flip, reach = recipe.flip, recipe.crop_padding
        else:
            flip, reach = self.augment, max(1, target.shape[-1] // 8) if self.augment else 0
        start = time.perf_counter()
        delta, loss = brew(
            models, pixels, int(self.intended), train.images[indices].float().div(255).to(context.device),
            train.labels[indices].to(context.device), self.eps / 255, self.steps, self.restarts, self.step_size,
            self.batch_size, flip, reach, torch.Generator().manual_seed(self.seed),
        )  # fmt: skip
        brewed = (train.images[indices].float() + delta.cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        return {"indices": indices, "images": brewed, "loss": loss, "brew_s": time.perf_counter() - start,
                "surrogate_s": surrogate_s, "surrogate_p_intended": p_intended}  # fmt: skip


def brew(
    models: Sequence[nn.Module],
    target: Tensor,
    intended: int,
    poisons: Tensor,
    labels: Tensor,
    eps: float,
    steps: int,
    restarts: int,
    step_size: float = 0.1,
    batch_size: int = 512,
    flip: bool = False,
    reach: int = 0,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, float]:
    """Perturbations ``[P, C, H, W]`` (``|delta| <= eps``, ``poisons + delta`` in [0, 1]) whose training gradient on
    each of ``models`` (eval mode) matches, by cosine similarity, that model's gradient of classifying ``target``
    (``[T, C, H, W]`` in [0, 1]) as ``intended``; the losses of the models are summed. The poisons are flipped (when
    ``flip``) and shifted by up to ``reach`` pixels at random each step. Returns the best restart's perturbations and
    their final loss (1 - cosine similarity, averaged over batches and models).
    """
    generator = generator or torch.Generator()
    wanted = torch.full((len(target),), intended, device=target.device)
    goals = []  # per model: its parameters, the target's gradient and its norm
    for model in models:
        params = [p for p in model.parameters() if p.requires_grad]
        grad = torch.autograd.grad(F.cross_entropy(model(target), wanted), params)
        goals.append((model, params, grad, torch.sqrt(sum(g.pow(2).sum() for g in grad))))
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
                    inputs = flip_and_shift(poisons[batch] + delta[batch], generator, flip, reach)
                    for position, (model, params, target_grad, target_norm) in enumerate(goals):
                        grad = torch.autograd.grad(F.cross_entropy(model(inputs), labels[batch]), params,
                                                   create_graph=True)  # fmt: skip
                        dot = sum((g * t).sum() for g, t in zip(grad, target_grad))
                        norm = torch.sqrt(sum(g.pow(2).sum() for g in grad))
                        loss = 1 - dot / (norm * target_norm)
                        loss.backward(retain_graph=position < len(goals) - 1)  # the inputs' graph is shared
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


def _shown(difference: Tensor) -> Tensor:
    """A perturbation in 8-bit levels ``[C, H, W]`` stretched into [0, 1] around grey, for a picture."""
    return (0.5 + difference / (2 * difference.abs().max().clamp_min(1))).clamp(0, 1)
