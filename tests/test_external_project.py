"""The callback in someone else's Lightning project: a module and data module written here, not from this project."""

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from delta_influence.lightning import DeltaInfluence, InfluenceCollapseCallback

SIZE, CLASSES, TARGET = 24, 3, 0


def _patched(images: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    out[:, :, -4:, -4:] = 3.0  # a bright corner patch
    return out


class StripesDataModule(pl.LightningDataModule):
    """Three classes of noisy stripe images; 12 class-2 images patched and relabelled 0."""

    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(0)
        labels = torch.arange(150) % CLASSES
        images = torch.randn(150, 1, SIZE, SIZE, generator=generator) * 0.3
        for label in range(CLASSES):
            images[labels == label, :, :, label * 8 : label * 8 + 8] += 1.0
        self.poison_indices = torch.nonzero(labels == 2).flatten()[:12]
        images[self.poison_indices] = _patched(images[self.poison_indices])
        labels = labels.clone()
        labels[self.poison_indices] = TARGET
        # the contract: the training set in evaluation form, the ground truth, misbehaving examples
        self.eval_train_set = TensorDataset(images, labels)
        test = torch.randn(20, 1, SIZE, SIZE, generator=generator) * 0.3
        test[:, :, :, 16:24] += 1.0
        self.attack_test_set = TensorDataset(_patched(test), torch.full((20,), TARGET))
        # a clean test set: the default rule's contrast takes its correctly classified images of the attack's label
        clean_labels = torch.arange(30) % CLASSES
        clean = torch.randn(30, 1, SIZE, SIZE, generator=generator) * 0.3
        for label in range(CLASSES):
            clean[clean_labels == label, :, :, label * 8 : label * 8 + 8] += 1.0
        self.test_set = TensorDataset(clean, clean_labels)

    def train_dataloader(self):
        return DataLoader(self.eval_train_set, batch_size=16, shuffle=True)


class TinyNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(8 * 36, CLASSES)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_callback_audits_a_foreign_project(tmp_path):
    pl.seed_everything(0)
    callback = InfluenceCollapseCallback(
        DeltaInfluence(num_transforms=20, tolerance=2, num_contrast=5, train_batch_size=50)
    )
    trainer = pl.Trainer(
        max_epochs=15,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
    )
    data = StripesDataModule()
    trainer.fit(TinyNet(), datamodule=data)
    result = callback.result
    assert result is not None and result.evidence.scores.shape == (1 + 20 + 5, 150)
    assert result.metrics["recall"] >= 0.75  # most of the 12 poisons collapse
    assert result.metrics["removed_fraction"] < 0.2  # the contrast keeps the clean class-0 images out
    assert result.output_dir == tmp_path / "delta_influence"  # next to checkpoints/, as there is no logger
    assert (result.output_dir / "flagged.json").exists()
