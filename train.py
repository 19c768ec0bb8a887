"""``python train.py fit --config configs/cifar10_badnets.yaml``: poison, train, audit and correct.

The command itself is ``delta_influence.cli.train``, installed as ``delta-influence`` too; ``python train.py --help``
lists the subcommands.
"""

from delta_influence.cli import train_command

if __name__ == "__main__":
    train_command()
