"""The image classifier trained on poisoned data, with clean accuracy and attack success rate."""

from typing import Literal, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from delta_influence.models import build_model
from delta_influence.surrogate import SurrogateRecipe
from delta_influence.training import check_optimizer, make_optimizer, scheduled_epochs

METRIC_NAMES = {"clean": "acc", "attack": "asr"}  # evaluation set name -> logged name; others log as <name>_acc


class PoisonClassifier(pl.LightningModule):
    """An image classifier. Evaluation sets are told apart by name (the keys of the data module's dict of
    evaluation loaders): ``clean`` logs ``val/acc`` (clean accuracy), ``attack`` logs ``val/asr`` (accuracy on the
    attack's evaluation set, labelled with what the attacker wants: the attack success rate), any other set
    ``val/<name>_acc``. A single loader is ``clean``; in a list, the first is ``clean`` and the others ``set<i>``.

    Args:
        arch: ``resnet18`` (CIFAR stem) or ``small_cnn``.
        num_classes: Number of classes (linked from the data module by ``train.py``).
        in_channels: Image channels (linked from the data module by ``train.py``).
        optimizer: ``sgd`` or ``adamw``.
        lr: Learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: Weight decay.
        milestones: When the learning rate is multiplied by ``lr_gamma``: fractions of ``trainer.max_epochs``
            (all in (0, 1), e.g. the paper's 14/25/35 of 40 epochs as ``[0.35, 0.625, 0.875]``; the schedule
            keeps its shape when max_epochs changes), or epochs (whole numbers below max_epochs).
        lr_gamma: Learning-rate factor at each milestone.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        in_channels: int = 3,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        milestones: Sequence[float] = (0.35, 0.625, 0.875),
        lr_gamma: float = 0.1,
    ) -> None:
        super().__init__()
        check_optimizer(optimizer, "model.optimizer")
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes, in_channels)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.eval_metrics = nn.ModuleDict()  # "<stage>_<set name>" -> accuracy, made when the sets are known

    @override
    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    @override
    def on_validation_epoch_start(self) -> None:
        self._make_metrics("val", self.trainer.val_dataloaders)

    @override
    def on_test_epoch_start(self) -> None:
        self._make_metrics("test", self.trainer.test_dataloaders)

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "test")

    def _make_metrics(self, stage: str, loaders) -> None:
        """Names the stage's evaluation sets and gives each an accuracy metric."""
        names = eval_set_names(loaders)
        setattr(self, f"_{stage}_names", names)
        for name in names:
            if f"{stage}_{name}" not in self.eval_metrics:
                metric = MulticlassAccuracy(self.hparams.num_classes, average="micro").to(self.device)
                self.eval_metrics[f"{stage}_{name}"] = metric

    def _evaluate(self, batch: tuple[Tensor, Tensor], dataloader_idx: int, stage: str) -> None:
        """Accuracy on the named evaluation set; on the attack's set it is the attack success rate."""
        images, labels = batch
        name = getattr(self, f"_{stage}_names")[dataloader_idx]
        key = f"{stage}_{name}"
        self.eval_metrics[key](self(images), labels)
        self.log(
            f"{stage}/{METRIC_NAMES.get(name, f'{name}_acc')}", self.eval_metrics[key], prog_bar=True,
            add_dataloader_idx=False, metric_attribute=f"eval_metrics.{key}",
        )  # fmt: skip

    def recipe(self, max_epochs: int, batch_size: int, flip: bool, crop_padding: int) -> SurrogateRecipe:
        """How this classifier is trained, as a surrogate recipe: its architecture, optimiser and schedule, with the
        trainer's ``max_epochs`` and the data module's batch size and augmentation."""
        hp = self.hparams
        return SurrogateRecipe(
            arch=hp.arch, epochs=max_epochs, optimizer=hp.optimizer, lr=hp.lr, momentum=hp.momentum,
            nesterov=hp.nesterov, weight_decay=hp.weight_decay, milestones=tuple(hp.milestones),
            lr_gamma=hp.lr_gamma, batch_size=batch_size, flip=flip, crop_padding=crop_padding,
        )  # fmt: skip

    @override
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = make_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.momentum, hp.nesterov, hp.weight_decay)
        trainer = self._trainer  # None outside a Trainer: epochs are then taken as they are
        milestones = scheduled_epochs(hp.milestones, trainer.max_epochs if trainer is not None else None)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def eval_set_names(loaders) -> list[str]:
    """The names of evaluation loaders, in the order Lightning numbers them.

    Example:
        >>> eval_set_names({"clean": None, "attack": None}), eval_set_names([None, None]), eval_set_names(None)
        (['clean', 'attack'], ['clean', 'set1'], ['clean'])
    """
    if isinstance(loaders, dict):
        return list(loaders)
    if isinstance(loaders, (list, tuple)):
        return ["clean"] + [f"set{i}" for i in range(1, len(loaders))]
    return ["clean"]
