"""Tiny data sets in the real on-disk formats, and a tiny CPU trainer."""

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision
from torchvision.io import write_png

from delta_influence.attacks import BadNets
from delta_influence.datamodules import PoisonedDataModule
from delta_influence.lightning_modules import PoisonClassifier

if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers share the cores: one thread each, as do their subprocesses
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _cpu_offline(monkeypatch, tmp_path):
    """Every test: CPU only, W&B offline and inside the test's folder, seeded."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)


def _class_images(rng: np.random.Generator, label: int, count: int, size: int = 32) -> np.ndarray:
    """Images of one class: a class-specific mean colour plus noise, uint8 [count, size, size, 3]."""
    base = np.array([(label * 23) % 256, (label * 71) % 256, (label * 131) % 256], dtype=np.float32)
    noise = rng.normal(0, 30, size=(count, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch) -> Path:
    """A tiny CIFAR-10 in torchvision's python pickle format (12 train and 4 test images per class), with its
    checksums registered as torchvision's own."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = np.repeat(np.arange(10), 12)
    train = np.concatenate([_class_images(rng, c, 12) for c in range(10)])
    order = rng.permutation(len(labels))
    train, labels = train[order], labels[order]
    files = {}
    for batch in range(5):
        part = slice(batch * 24, (batch + 1) * 24)
        files[f"data_batch_{batch + 1}"] = {
            "data": train[part].transpose(0, 3, 1, 2).reshape(-1, 3072),
            "labels": labels[part].tolist(),
        }
    test_labels = np.repeat(np.arange(10), 4)
    files["test_batch"] = {
        "data": np.concatenate([_class_images(rng, c, 4) for c in range(10)]).transpose(0, 3, 1, 2).reshape(-1, 3072),
        "labels": test_labels.tolist(),
    }
    files["batches.meta"] = {"label_names": CIFAR_CLASSES}
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    _write_pickles(folder, files, torchvision.datasets.CIFAR10, train_files, "test_batch", "batches.meta", monkeypatch)
    return tmp_path / "cifar"


@pytest.fixture
def cifar100_root(tmp_path, monkeypatch) -> Path:
    """A tiny CIFAR-100 in torchvision's python pickle format (3 train and 1 test image per fine class), with its
    checksums registered as torchvision's own."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{c}" for c in range(100)]
    names[68], names[86] = "road", "telephone"
    files = {}
    for split, count in (("train", 3), ("test", 1)):
        labels = np.repeat(np.arange(100), count)
        images = np.concatenate([_class_images(rng, c, count) for c in range(100)])
        files[split] = {
            "data": images.transpose(0, 3, 1, 2).reshape(-1, 3072),
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
        }
    files["meta"] = {"fine_label_names": names, "coarse_label_names": [f"super{c}" for c in range(20)]}
    _write_pickles(folder, files, torchvision.datasets.CIFAR100, ["train"], "test", "meta", monkeypatch)
    return tmp_path / "cifar100"


def _write_pickles(folder: Path, files: dict, cls, train: list[str], test: str, meta: str, monkeypatch) -> None:
    """Writes torchvision's pickle files and registers their checksums as the data set class's own."""
    checksums = {}
    for name, content in files.items():
        raw = pickle.dumps(content)
        (folder / name).write_bytes(raw)
        checksums[name] = hashlib.md5(raw).hexdigest()
    monkeypatch.setattr(cls, "train_list", [[name, checksums[name]] for name in train])
    monkeypatch.setattr(cls, "test_list", [[test, checksums[test]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": checksums[meta]})


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A tiny image-folder tree root/{train,test}/<class>/NNNN.png with 3 classes."""
    rng = np.random.default_rng(1)
    root = tmp_path / "folder"
    for split, count in (("train", 10), ("test", 3)):
        for label, name in enumerate(["cat", "dog", "ship"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(_class_images(rng, label, count, size=24)):
                write_png(torch.from_numpy(image).permute(2, 0, 1).contiguous(), str(folder / f"{i:04d}.png"))
    return root


def digits_data(per_class: int = 40, num_poisons: int = 20, **kwargs) -> PoisonedDataModule:
    """The digits data module, small, BadNets with white pixels (8 -> 5)."""
    attack = BadNets(victim=8, target=5, num_poisons=num_poisons, value=1.0)
    data = PoisonedDataModule(
        "digits", attack=attack, per_class=per_class, batch_size=32, crop_padding=0, flip=False, **kwargs
    )
    data.setup()
    return data


def tiny_trainer(tmp_path: Path, max_epochs: int = 3, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """A small CNN trained on poisoned digits (shared by tests that only read it): (data module, model)."""
    pl.seed_everything(0, verbose=False)
    data = digits_data()
    model = PoisonClassifier(arch="small_cnn", num_classes=10, in_channels=1, lr=0.05, milestones=[])
    trainer = tiny_trainer(tmp_path_factory.mktemp("victim"), max_epochs=8, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    return data, model


@pytest.fixture(scope="session")
def shared_factors(tmp_path_factory) -> Path:
    """One kronfluence factor folder for the session: audits of the same weights and data fit their factors once."""
    return tmp_path_factory.mktemp("factors")
