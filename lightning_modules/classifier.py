"""The image classifier trained on poisoned data, with clean accuracy and attack success rate."""

from typing import Literal, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_modules.models import build_model

CLEAN = 0  # PoisonedDataModule's evaluation loaders: 0 clean test set, 1 triggered test set


class PoisonClassifier(pl.LightningModule):
    """An image classifier. Evaluation loader 0 is the clean test set (``acc``), loader 1, when present, the
    triggered test set labelled with the attack's target (``asr``, the attack success rate).

    Args:
        arch: ``resnet18`` (CIFAR stem) or ``small_cnn``.
        num_classes: Number of classes (linked from the data module by ``train.py``).
        in_channels: Image channels (linked from the data module by ``train.py``).
        optimizer: ``sgd`` or ``adamw``.
        lr: Learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: Weight decay.
        milestones: Epochs at which the learning rate is multiplied by ``lr_gamma``.
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
        milestones: Sequence[int] = (14, 25, 35),
        lr_gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"model.optimizer={optimizer!r} is not known; use 'sgd' or 'adamw'.")
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes, in_channels)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_asr = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_asr = MulticlassAccuracy(num_classes, average="micro")

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
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = CLEAN) -> None:
        self._evaluate(batch, dataloader_idx, "val", self.val_acc, self.val_asr)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = CLEAN) -> None:
        self._evaluate(batch, dataloader_idx, "test", self.test_acc, self.test_asr)

    def _evaluate(
        self,
        batch: tuple[Tensor, Tensor],
        dataloader_idx: int,
        stage: str,
        acc: MulticlassAccuracy,
        asr: MulticlassAccuracy,
    ) -> None:
        """Accuracy on clean samples, or share of triggered samples predicted as the target."""
        images, labels = batch
        metric, name = (acc, "acc") if dataloader_idx == CLEAN else (asr, "asr")
        metric(self(images), labels)
        self.log(f"{stage}/{name}", metric, prog_bar=True, add_dataloader_idx=False)

    @override
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
