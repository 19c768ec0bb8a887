"""What tells the rule's clean members of the attacker's label from its poisons: the rule's own contrast ratio beside
four other tests, on a victim's newest audit (the rule's flagged set, before verification). Per test, the AUROC of
poisons against the flagged clean samples (1: every poison scores above every clean sample; 0.5: no separation) and
the most of all the poisons that a cut on it keeps at 95 % precision, the cut chosen knowing the poisons (an upper
bound on any rule that uses the test on this set):

- ratio: the rule's statistic, the query's score over |C| (C: the mean score on the clean contrast images);
- label kept: the victim's mean probability of the sample's label over the 50 transformed copies the audit makes of
  the query, made of the training sample instead (does its label survive the transformations?);
- consensus: the sample's median support (EK-FAC) for the other flagged samples, each query's row normalised by its
  median |score| on the unflagged clean members of the label, over |C| (a trigger is shared by the poisons);
- trigger removed: the victim's probability of the label lost once an estimate of a shared additive trigger is
  subtracted from the sample (1 - p(label | x - 1.5 d), d: the flagged set's mean input minus the other labels'
  mean input; a poison's label comes from the trigger, a clean member's from its content);
- whole model: unlearning groups of 8 flagged samples in the whole network, not only the head (30 SGD steps at 0.01,
  Nesterov 0.9: the group toward uniform predictions, the label's other samples and as many others toward their
  labels, batches of 128), the query's loss rise minus the contrast images' (the verification's effect); groups of
  poisons against groups of clean samples.

    python benchmarks/detection.py [--attack smooth] [--seed 1]    # first: the victim and its audit
    python benchmarks/separation.py [--attack smooth] [--seed 1]
"""

import copy
import functools
import json
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import load_victim, newest, parse_args, report, run_tag
from sklearn.metrics import roc_auc_score
from torch.utils.data import Subset

from delta_influence.examples import evaluating
from delta_influence.influence import InfluenceAnalysis
from delta_influence.pipeline import eval_train_set_of
from delta_influence.queries import make_queries
from delta_influence.verification import _retain

GROUP, GROUPS, STEPS, LR, REMOVAL = 8, 4, 30, 0.01, 1.5


def main() -> None:
    args = parse_args(__doc__)
    audit = newest(f"detection_audit_{args.attack}{run_tag(args)}", f"benchmarks/detection.py --attack {args.attack}")
    cli = load_victim(args)
    data, victim = cli.datamodule, cli.model.eval()
    train = eval_train_set_of(data)
    flagged = torch.tensor(json.loads((audit / "verification.json").read_text())["rule_flagged"])
    poisons = torch.as_tensor(data.poison_indices)
    is_poison = torch.isin(flagged, poisons).numpy()
    label = int(data.attack.target)
    labels = torch.as_tensor(train.labels)
    members = torch.nonzero(labels == label).flatten()
    contrast = torch.load(audit / "contrast.pt")["contrast"]
    query_scores = torch.load(audit / "scores.pt")[0]
    clean_count = int((~is_poison).sum())
    print(f"{audit.name}: the rule flagged {len(flagged)}, {int(is_poison.sum())} poisons, {clean_count} clean")
    C = contrast[flagged].abs()
    auroc = functools.partial(separation, is_poison=is_poison, poisons=len(poisons))
    ratio = query_scores[flagged] / C
    rows = [auroc("ratio: query / |C|", ratio)]

    kept = torch.stack([label_kept(victim, train, int(i)) for i in flagged])
    rows.append(auroc("label kept under the 50 transformations", kept))

    images = torch.stack([torch.as_tensor(train[i][0]) for i in range(len(train))])
    trigger = images[flagged].mean(dim=0) - images[labels != label].mean(dim=0)
    with torch.no_grad(), evaluating(victim):
        lost = 1 - victim(images[flagged] - REMOVAL * trigger).softmax(dim=1)[:, label]
    rows.append(auroc("trigger removed: label lost", lost))
    rows.append(auroc("ratio + trigger removed (ranks)", ranks(ratio) + ranks(lost)))

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as factors:
        analysis = InfluenceAnalysis(victim, train, factors, train_batch_size=256, scored=members)
        analysis.fit_factors()
        support = analysis.pairwise_scores(Subset(train, flagged.tolist()))  # [flagged queries, members]
    column = {int(m): k for k, m in enumerate(members)}
    clean = torch.nonzero(~torch.isin(members, torch.cat([poisons, flagged]))).flatten()  # columns: unflagged, clean
    normalised = support / support[:, clean].abs().median(dim=1).values[:, None]
    among = normalised[:, [column[int(i)] for i in flagged]].clone().fill_diagonal_(float("nan"))
    rows.append(auroc("consensus / |C|", torch.nanmedian(among, dim=0).values / C))
    rows[-1]["seconds"] = time.perf_counter() - start

    query, contrast_images = audit_images(audit)
    tester = WholeModel(victim, images, labels, label, query, contrast_images, flagged)
    generator = torch.Generator().manual_seed(args.seed)
    for name, pool in (
        ("whole model: groups of poisons", flagged[is_poison]),
        ("whole model: groups of clean", flagged[~is_poison]),
    ):
        pool, tester.seconds = pool[torch.randperm(len(pool), generator=generator)], 0.0
        effects = [tester.effect(pool[k * GROUP : (k + 1) * GROUP]) for k in range(min(GROUPS, len(pool) // GROUP))]
        finite = [effect for effect in effects if np.isfinite(effect)]  # a test can diverge: shown as nan
        mean = float(np.mean(finite)) if finite else None
        shown = ", ".join(f"{effect:.2f}" for effect in effects)
        rows.append(
            {"test": name, "groups": len(effects), "effects": shown, "mean_effect": mean, "seconds": tester.seconds}
        )
    columns = ["test", "auroc", "best_recall_at_95", "poisons_median", "clean_median", "groups", "effects"]
    columns += ["mean_effect", "seconds"]
    report(f"separation_{args.attack}{run_tag(args)}", rows, columns)


def separation(name: str, values: torch.Tensor, is_poison: np.ndarray, poisons: int) -> dict:
    """The AUROC of poisons against clean samples on ``values``, the largest share of all ``poisons`` kept by a cut
    (the ``k`` highest values) at a precision of at least 95 %, and each side's median."""
    values = values.float().numpy()
    both = 0 < is_poison.sum() < len(is_poison)
    found = np.cumsum(is_poison[np.argsort(-values, kind="stable")])  # poisons among the k highest, k = 1, 2, ...
    precise = found / np.arange(1, len(found) + 1) >= 0.95
    return {
        "test": name,
        "auroc": float(roc_auc_score(is_poison, values)) if both else None,
        "best_recall_at_95": float(found[precise].max() / poisons) if precise.any() else 0.0,
        "poisons_median": float(np.median(values[is_poison])),
        "clean_median": float(np.median(values[~is_poison])) if both else None,
    }


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank, 0 for the smallest."""
    return values.argsort().argsort().float()


@torch.no_grad()
def label_kept(model: torch.nn.Module, train, index: int) -> torch.Tensor:
    """The model's mean probability of a training sample's label over the audit's 50 transformations of it."""
    image, label = train[index]
    copies = make_queries(torch.as_tensor(image), int(label), 10, 50, seed=index).images[1:]
    with evaluating(model):
        return model(copies).softmax(dim=1)[:, int(label)].mean()


def audit_images(audit) -> tuple[torch.Tensor, torch.Tensor]:
    """The audit's query (with its label) and clean contrast images."""
    saved = torch.load(audit / "queries.pt")
    return (saved["images"][:1], int(saved["labels"][0])), saved["contrast_images"]


class WholeModel:
    """Unlearns a group in every layer of a copy of the model and measures the query's loss rise over the
    contrast's."""

    def __init__(self, model, images, labels, label, query, contrast, flagged) -> None:
        self.model, self.images, self.labels, self.label = model, images, labels, label
        (self.query, _), self.contrast = query, contrast
        self.retain = _retain(labels, label, flagged, seed=0)  # as the verification's: the label, as many others
        self.before, self.seconds = self.losses(model), 0.0

    def losses(self, model) -> tuple[float, float]:
        with torch.no_grad():
            query = F.cross_entropy(model(self.query), torch.tensor([self.label])).item()
            contrast = F.cross_entropy(model(self.contrast), torch.full((len(self.contrast),), self.label)).item()
        return query, contrast

    def effect(self, group: torch.Tensor) -> float:
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        model = copy.deepcopy(self.model).eval()  # the victim's normalisation statistics stay as they are
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True)
        for _ in range(STEPS):
            batch = self.retain[torch.randint(len(self.retain), (128,), generator=generator)]
            optimizer.zero_grad()
            loss = -F.log_softmax(model(self.images[group]), dim=-1).mean()
            (loss + F.cross_entropy(model(self.images[batch]), self.labels[batch])).backward()
            optimizer.step()
        query, contrast = self.losses(model)
        self.seconds += time.perf_counter() - start
        return (query - self.before[0]) - (contrast - self.before[1])


if __name__ == "__main__":
    main()
