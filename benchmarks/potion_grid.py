"""How selective Potion's dampening is on a victim: its importances once, then a grid of shares ``s`` (the quantity
Potion's search moves), each dampening a fresh copy of the victim. Per share: the share of parameters dampened, the
flagged set's accuracy on its labels and the accuracy of the retained training samples of that label (both relative
to the victim's), clean accuracy, ASR and the test accuracy on the attacker's label.

    python benchmarks/detection.py [--attack smooth] [--seed 1]    # first: the victim and its flagged set
    python benchmarks/potion_grid.py [--attack smooth] [--seed 1]

Dampening that removes the poisons rather than the label lowers the first relative accuracy well before the second;
where the two fall together, the attack is only removed with the attacker's class.
"""

import copy

import torch
from common import load_victim, newest, parse_args, report, run_tag
from torch.utils.data import DataLoader, Subset

from delta_influence.examples import accuracy
from delta_influence.pipeline import eval_train_set_of
from delta_influence.unlearning import dampen_share, importance_ratios, importances, retained_indices


def main() -> None:
    args = parse_args(__doc__, [("--points", int, 24, "shares on the grid, each 1.21 times the last")])
    audit = newest(f"detection_audit_{args.attack}{run_tag(args)}", f"benchmarks/detection.py --attack {args.attack}")
    cli = load_victim(args)
    data, victim = cli.datamodule, cli.model
    train = eval_train_set_of(data)
    flagged = torch.load(audit / "flagged.pt")
    label = int(data.attack.target)
    kept = retained_indices(len(train), flagged)
    forget, retained = Subset(train, flagged.tolist()), Subset(train, kept)
    retained_label = Subset(train, [i for i in kept if int(train.labels[i]) == label])
    test_label = Subset(data.test_set, (data.test_set.labels == label).nonzero().flatten().tolist())
    forget_importance = importances(victim, DataLoader(forget, batch_size=512), "cpu", "logit_norm")
    kept_importance = importances(victim, DataLoader(retained, batch_size=512), "cpu", "logit_norm")
    ratios = importance_ratios(forget_importance, kept_importance)
    forget_before, label_before = accuracy(victim, forget), accuracy(victim, retained_label)
    print(f"{audit.name}: {len(flagged)} flagged; the victim's accuracy on them {forget_before:.3f}, on the retained "
          f"samples of label {label} {label_before:.3f}")  # fmt: skip
    share, rows = len(flagged) / len(train) / 25 / 1.21**6, []  # from below Potion's start
    for _ in range(args.points):
        model = copy.deepcopy(victim)
        _, fraction = dampen_share(model, forget_importance, kept_importance, ratios, share)
        rows.append(
            {
                "share": share,
                "dampened": fraction,
                "flagged_acc": accuracy(model, forget) / forget_before,
                "retained_label_acc": accuracy(model, retained_label) / label_before,
                "clean_acc": accuracy(model, data.test_set),
                "asr": accuracy(model, data.attack_test_set),
                "label_acc": accuracy(model, test_label),
            }
        )
        print(rows[-1], flush=True)
        share *= 1.21
    report(f"potion_grid_{args.attack}{run_tag(args)}", rows, list(rows[0]))


if __name__ == "__main__":
    main()
