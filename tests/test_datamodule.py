from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from conftest import _class_images, digits_data
from torchvision.io import write_png

from delta_influence.attacks import BadNets, SmoothTrigger
from delta_influence.datamodules import DataNotFoundError, PoisonedDataModule
from delta_influence.errors import ConfigError
from delta_influence.surrogate import SurrogateRecipe


def test_digits_poisoned_sets():
    data = digits_data(per_class=40, num_poisons=20)
    assert len(data.train_set) == len(data.eval_train_set) == 400
    assert data.num_classes == 10 and data.in_channels == 1
    poisons = data.poison_indices
    assert len(poisons) == 20 and (data.eval_train_set.labels[poisons] == 5).all()
    image, label = data.eval_train_set[int(poisons[0])]
    pixel = image * data.std.view(-1, 1, 1) + data.mean.view(-1, 1, 1)
    assert image.shape == (1, 32, 32) and label == 5
    assert torch.allclose(pixel[:, 28, 30], torch.ones(1))  # the white trigger
    triggered = data.attack_test_set
    assert (triggered.labels == 5).all() and len(triggered) == 44  # a quarter of the 174 eights
    assert len(data.val_dataloader()) == 2


def test_eval_train_set_is_fixed_and_train_set_is_augmented():
    data = PoisonedDataModule("digits", attack=BadNets(num_poisons=5, value=1.0), per_class=10, crop_padding=4)
    data.setup()
    assert torch.equal(data.eval_train_set[3][0], data.eval_train_set[3][0])
    torch.manual_seed(0)
    draws = torch.stack([data.train_set[3][0] for _ in range(8)])
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    assert data.train_set.images is data.eval_train_set.images  # one copy of the pixels


def test_setup_is_idempotent_and_seeded():
    first = digits_data(seed=1)
    poisons = first.poison_indices.clone()
    first.setup("fit")
    assert torch.equal(first.poison_indices, poisons)
    assert torch.equal(digits_data(seed=1).poison_indices, poisons)
    assert not torch.equal(digits_data(seed=2).poison_indices, poisons)


def test_per_class_subset_keeps_k_per_class():
    data = digits_data(per_class=15, num_poisons=3)
    labels = data.eval_train_set.labels.clone()
    labels[data.poison_indices] = 8  # undo the relabelling
    assert torch.bincount(labels).tolist() == [15] * 10


def test_cifar10_pickle_batches(cifar10_root):
    data = PoisonedDataModule("cifar10", root=str(cifar10_root), download=False, attack=BadNets(num_poisons=4))
    data.prepare_data()
    data.setup()
    assert len(data.train_set) == 120 and len(data.test_set) == 40 and len(data.attack_test_set) == 4
    assert data.classes[8] == "ship" and data.in_channels == 3
    image, label = data.eval_train_set[int(data.poison_indices[0])]
    assert image.shape == (3, 32, 32) and label == 5


def test_cifar100_pickle_files_with_the_reference_smooth_trigger(cifar100_root, tmp_path):
    attack = SmoothTrigger(num_poisons=2, surrogate=SurrogateRecipe(epochs=1), num_images=20, max_passes=1)
    data = PoisonedDataModule("cifar100", root=str(cifar100_root), download=False, attack=attack, crop_padding=0)
    data.prepare_data()
    data.setup()
    assert data.num_classes == 100 and data.classes[86] == "telephone" and data.classes[68] == "road"
    assert len(data.train_set) == 300 and len(data.test_set) == 100 and len(data.attack_test_set) == 1
    assert (data.eval_train_set.labels[data.poison_indices] == 68).all()
    assert list((cifar100_root / "attack_cache").glob("smooth_trigger-*.pt"))  # cached next to the data


def test_image_folder(image_folder):
    data = PoisonedDataModule(
        "folder", root=str(image_folder), image_size=32, attack=BadNets(victim=2, target=0, num_poisons=3)
    )
    data.setup()
    assert data.classes == ("cat", "dog", "ship") and data.num_classes == 3
    assert len(data.train_set) == 30 and data.eval_train_set[0][0].shape == (3, 32, 32)
    assert len(data.attack_test_set) == 3


def test_missing_cifar_without_download_names_root_and_offline_config(tmp_path):
    data = PoisonedDataModule("cifar10", root=str(tmp_path / "nothing"), download=False)
    with pytest.raises(DataNotFoundError, match=r"--data.root=.*configs/digits_badnets.yaml"):
        data.prepare_data()


def test_failed_download_names_root_and_offline_config(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    data = PoisonedDataModule("cifar10", root=str(tmp_path / "nothing"), download=True)
    with pytest.raises(DataNotFoundError, match=r"could not be downloaded .*no network.*configs/digits_badnets.yaml"):
        data.prepare_data()


def test_missing_image_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"has no 'train' and 'test' \(or 'val'\) folders"):
        PoisonedDataModule("folder", root=str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset": "mnist"}, r"data.dataset='mnist' is not known"),
        ({"attack": BadNets(victim=12)}, r"attack.victim=12 is out of range"),
        ({"attack": BadNets(victim=8, target=8)}, r"both 8"),
        ({"per_class": 0}, r"data.per_class=0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoisonedDataModule(**{"dataset": "digits", **kwargs})


def test_more_poisons_than_victims_fails_in_setup():
    data = PoisonedDataModule("digits", attack=BadNets(num_poisons=11, value=1.0), per_class=10)
    with pytest.raises(ValueError, match=r"attack.num_poisons=11 is more than the 10"):
        data.setup()


def test_unpadded_numeric_folders_are_numbered_numerically(tmp_path):
    """Folders 0..11: alphabetically "10" would be class 2; numbered numerically, class 10 is folder "10"."""
    rng = np.random.default_rng(0)
    names = [str(i) for i in range(12)]
    for split, count in (("train", 4), ("test", 2)):
        for label, name in enumerate(names):
            (tmp_path / split / name).mkdir(parents=True)
            for i, image in enumerate(_class_images(rng, label, count, size=8)):
                write_png(
                    torch.from_numpy(image).permute(2, 0, 1).contiguous(), str(tmp_path / split / name / f"{i}.png")
                )
    data = PoisonedDataModule("folder", root=str(tmp_path), attack=BadNets(victim=10, target="2", num_poisons=2,
                                                                         pixels=((0, 0),)))  # fmt: skip
    data.setup()
    assert data.classes == tuple(names) and (data.attack.victim, data.attack.target) == (10, 2)
    original = data.source.load().train_labels
    assert (original[data.poison_indices] == 10).all() and (data.eval_train_set.labels[data.poison_indices] == 2).all()


def test_attack_classes_by_name(cifar10_root):
    data = PoisonedDataModule("cifar10", root=str(cifar10_root), download=False,
                              attack=BadNets(victim="ship", target="dog", num_poisons=3))  # fmt: skip
    assert (data.attack.victim, data.attack.target) == (8, 5)  # known from the meta file before loading
    data.setup()
    assert (data.eval_train_set.labels[data.poison_indices] == 5).all() and len(data.attack_test_set) == 4
    with pytest.raises(ConfigError, match=r"attack.target='lorry' is not a class of this data set; its classes are "):
        PoisonedDataModule("cifar10", root=str(cifar10_root), download=False, attack=BadNets(target="lorry"))


def test_image_folder_skips_other_files_and_names_an_unreadable_image(image_folder):
    (image_folder / "train" / "cat" / "notes.txt").write_text("not an image")
    (image_folder / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    data = PoisonedDataModule("folder", root=str(image_folder), image_size=32, attack=None)
    data.setup()
    assert len(data.train_set) == 30  # the two extra files were skipped
    broken = image_folder / "train" / "dog" / "9999.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"9999.png is not a readable image"):
        PoisonedDataModule("folder", root=str(image_folder), image_size=32, attack=None).setup()
