"""``python unlearn.py --run runs/delta-influence/<run>``: a corrective fit of a trained victim without a file of
flagged training indices.

The command itself is ``delta_influence.cli.unlearn``, installed as ``delta-influence-unlearn`` too;
``python unlearn.py --help`` lists its options.
"""

from delta_influence.cli import unlearn_command

if __name__ == "__main__":
    unlearn_command()
