"""Trains the small CNN on a BadNets-poisoned CIFAR-10 subset (CPU-sized) and prints clean accuracy and ASR.

python benchmarks/train_poisoned.py            # 1,000 images per class, 250 poisons ship -> dog, 15 epochs
"""

from common import cifar_datamodule, parse_args, report, train_victim


def main() -> None:
    args = parse_args(__doc__)
    data = cifar_datamodule(args)
    _, metrics = train_victim(args, data)
    row = {"train": len(data.train_set), "poisons": len(data.poison_indices), **metrics}
    report("train_poisoned", [row], ["train", "poisons", "epochs", "clean_acc", "asr", "train_s"])


if __name__ == "__main__":
    main()
