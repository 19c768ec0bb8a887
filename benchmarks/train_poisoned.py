"""Trains the small CNN on the poisoned CPU CIFAR-10 benchmark set and prints clean accuracy and ASR.

python benchmarks/train_poisoned.py   # configs/benchmarks/cifar10_badnets_cpu.yaml without its audit
"""

from common import parse_args, report, run_tag, train_victim


def main() -> None:
    args = parse_args(__doc__)
    cli = train_victim(args, ["--delta_influence=null"])
    data = cli.datamodule
    row = {"train": len(data.train_set), "poisons": len(data.poison_indices), **cli.victim_metrics}
    report(f"train_poisoned{run_tag(args)}", [row], ["train", "poisons", "epochs", "clean_acc", "asr", "train_s"])


if __name__ == "__main__":
    main()
