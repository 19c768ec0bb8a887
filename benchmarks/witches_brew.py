"""Witches' Brew on the CPU CIFAR-10 setting: for fixed (target, intended class) pairs, brew the poisons, train a victim
from scratch on them, and audit every success with Δ-Influence, then retrain without what it flagged.

    python benchmarks/witches_brew.py                                   # 4 pairs, budget 5 %, 3 restarts of 80 steps
    python benchmarks/witches_brew.py --pairs 8 --budget 0.1 --restarts 4

Targets are drawn with --seed among the test images that the surrogate (the clean model the attacker trains, as in the
attack) classifies correctly, the paper's practice; each target's intended class is drawn uniformly among the other
classes. Every pair has its own brew (cached under results/attack_cache) and its own victim (the small CNN, trained
from scratch as in the other benchmarks). Success: the victim classifies the target as the intended class. On each
success, one scoring pass gives both decision rules (the default with the clean-class contrast and the reference rule
without it); the victim is then retrained from scratch without the default rule's flagged samples. The table is
printed and written to results/witches_brew.json.
"""

import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from common import RESULTS, evaluate, extract, parse_args, report, small_cnn, trainer

from datamodules import PoisonedDataModule
from delta_influence import detection_metrics
from delta_influence.attacks import WitchesBrew
from delta_influence.audit import DeltaInfluence
from delta_influence.detectors import DetectionInput
from delta_influence.examples import evaluating, select_contrast
from delta_influence.surrogate import SurrogateRecipe, cached_surrogate
from lightning_modules.unlearning import Retrain, run_corrective_fit

COLUMNS = [
    "pair", "target", "true", "intended", "surrogate_p", "brew_loss", "brew_s", "train_s", "clean_acc", "victim_p",
    "success", "flagged", "precision", "recall", "ref_flagged", "ref_precision", "ref_recall", "retrain_acc",
    "retrain_success",
]  # fmt: skip


def main() -> None:
    args = parse_args(
        __doc__,
        [
            ("--pairs", int, 4, "(target, intended class) pairs"),
            ("--budget", float, 0.05, "poisons per target: a fraction of the training set, or a count"),
            ("--eps", float, 16.0, "L-inf bound in 8-bit levels"),
            ("--steps", int, 80, "signed-Adam steps per restart"),
            ("--restarts", int, 3, "restarts per brew (lowest loss kept)"),
        ],
    )
    root = str(extract(args.archive, args.cache))
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    device = "cuda" if accelerator == "gpu" else "cpu"
    recipe = SurrogateRecipe()
    pairs = draw_pairs(root, args, recipe, device)
    print("pairs (test index, true class -> intended class):", [(t, c, i) for t, c, i, _ in pairs])
    rows = []
    for number, (target, true, intended, surrogate_p) in enumerate(pairs):
        attack = WitchesBrew(
            target=target, intended=intended, budget=args.budget, eps=args.eps, steps=args.steps,
            restarts=args.restarts, surrogate=recipe, seed=args.seed,
        )  # fmt: skip
        data = datamodule(root, args, attack)
        row = {"pair": number, "target": target, "true": true, "intended": intended, "surrogate_p": surrogate_p,
               "brew_loss": data.attack_info["loss"], "brew_s": data.attack_info["brew_s"]}  # fmt: skip
        pl.seed_everything(args.seed + 1, verbose=False)  # the victim starts from another seed than the surrogate
        victim = small_cnn(data, args.epochs)
        start = time.perf_counter()
        trainer(args.epochs, num_sanity_val_steps=0, limit_val_batches=0).fit(victim, datamodule=data)
        row |= {"train_s": time.perf_counter() - start, "clean_acc": evaluate(victim, data)["clean_acc"]}
        image, label = data.attack_test_set[0]
        probabilities = class_probabilities(victim, image)
        row["victim_p"] = float(probabilities[int(label)])
        row["success"] = int(probabilities.argmax()) == int(label)
        if row["success"]:
            row |= audit(victim, data, image, int(label), args, accelerator, device)
        rows.append(row)
        report("witches_brew", rows, COLUMNS)  # kept up to date after every pair
    successes = [row for row in rows if row["success"]]
    print(f"\nsuccess: {len(successes)} of {len(rows)} targets (budget {args.budget}, eps {args.eps:g}/255, "
          f"{args.restarts} restarts x {args.steps} steps)")  # fmt: skip
    if successes:
        mean_recall = sum(row["recall"] for row in successes) / len(successes)
        print(f"Δ-Influence (default rule) mean recall on the successes: {mean_recall:.1%}")


def draw_pairs(root: str, args, recipe: SurrogateRecipe, device: str) -> list[tuple[int, int, int, float]]:
    """``args.pairs`` (test index, true class, intended class, surrogate's probability of the intended class): targets
    drawn among the test images the surrogate classifies correctly, intended classes among the other classes."""
    clean = PoisonedDataModule(
        dataset="folder", root=root, attack=None, per_class=args.per_class, seed=args.seed,
        cache_dir=str(RESULTS / "attack_cache"),
    )  # fmt: skip
    clean.setup()
    train, test = clean.eval_train_set, clean.test_set
    model, _ = cached_surrogate(
        train.images, train.labels, clean.num_classes, recipe, args.seed, device, clean.cache_dir
    )  # fmt: skip
    generator = torch.Generator().manual_seed(args.seed)
    pairs = []
    for index in torch.randperm(len(test.labels), generator=generator).tolist():
        pixels = test.images[index].float().div(255)[None].to(device)
        with torch.no_grad():
            probabilities = model(pixels).softmax(1)[0].cpu()
        true = int(test.labels[index])
        if int(probabilities.argmax()) != true:
            continue
        others = [c for c in range(clean.num_classes) if c != true]
        intended = others[int(torch.randint(len(others), (1,), generator=generator))]
        pairs.append((index, true, intended, float(probabilities[intended])))
        if len(pairs) == args.pairs:
            return pairs
    return pairs


def datamodule(root: str, args, attack: WitchesBrew) -> PoisonedDataModule:
    data = PoisonedDataModule(
        dataset="folder", root=root, attack=attack, per_class=args.per_class, batch_size=128,
        crop_padding=args.crop_padding, flip=args.flip, seed=args.seed, cache_dir=str(RESULTS / "attack_cache"),
    )  # fmt: skip
    data.prepare_data()
    data.setup()
    return data


def class_probabilities(model, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), evaluating(model):
        return model(image[None]).softmax(1)[0]


def audit(victim, data: PoisonedDataModule, image, label: int, args, accelerator: str, device: str) -> dict:
    """Δ-Influence on the target (one scoring pass, both rules), then retraining without the default rule's set."""
    contrast = torch.stack([data.test_set[i][0] for i in select_contrast(victim, data.test_set, label, 5)])
    with tempfile.TemporaryDirectory() as factors:
        inputs = DetectionInput(
            victim, data.eval_train_set, data.num_classes, Path(factors), query=(image, label), contrast=contrast,
            device=device,
        )  # fmt: skip
        detection = DeltaInfluence(train_batch_size=256).detect(inputs)
    total, poisons = len(data.eval_train_set), data.poison_indices
    default = detection_metrics(detection.flagged, total, poisons)
    reference = detection_metrics(detection.evidence.decision.collapsed, total, poisons)
    torch.manual_seed(args.seed)
    retrained = run_corrective_fit(
        victim, Retrain(), detection.flagged, data.train_set, data.eval_train_set, data.test_set, data.attack_test_set,
        batch_size=data.batch_size, max_epochs=args.epochs, out_dir=RESULTS / "witches_brew_unlearn",
        accelerator=accelerator, seed=args.seed, progress_bar=False,
    )  # fmt: skip
    retrained = retrained or {"acc": None, "asr": None}  # None: nothing flagged, nothing retrained
    return {
        "flagged": int(default["flagged"]), "precision": default["precision"], "recall": default["recall"],
        "ref_flagged": int(reference["flagged"]), "ref_precision": reference["precision"],
        "ref_recall": reference["recall"], "retrain_acc": retrained["acc"], "retrain_success": retrained["asr"],
    }  # fmt: skip


if __name__ == "__main__":
    main()
