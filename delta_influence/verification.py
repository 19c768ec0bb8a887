"""The verification stage: test a flagged set by forgetting its parts in the classifier head, then recover the poisons
the model no longer feels.

The test is Poison Forensics' (Shan et al., USENIX Security 2022): a group of training samples is responsible for a
misbehaviour when forgetting the group weakens it. Forgetting here touches only the classifier head, the model's last
linear layer, as theirs does: the features feeding the head are computed once, and each test trains a copy of the head
on them (the group toward uniform predictions; every other sample of the query's label and as many others toward
their labels), so that a test costs a fraction of a second, not a training run.

- **Prune** (group testing). The flagged set is split in two by 2-means on the samples' influence profiles (their
  scores on the query, its copies and the contrast, normalised: a poison's profile differs from a clean sample's of
  the same label) and each part is forgotten alone. A part is guilty when forgetting it raises the query's loss,
  over and above the clean contrast images' loss, by at least ``keep_fraction`` of what forgetting the whole flagged
  set does in the same run. A part that is not holds no sample the query depends on and is dropped; a guilty part is
  split again until it has at most ``min_group`` samples, then kept (a guilty group neither of whose halves is guilty
  alone is kept whole). Forgetting a group of clean images of the label moves the query no more than the contrast; a
  handful of poisons moves it almost as much as all of them. Samples
  the rule flagged on the support floor alone are kept as flagged, untested: that evidence marks clean-label poisons,
  which act through the features they shape rather than through the head (on a Witches' Brew victim, forgetting 403
  such samples, 402 of them poisons, in the head lowered the target's loss), so the head's verdict on them says
  nothing; the prune judges the rest, against the effect of forgetting all of the rest.
- **Recover.** The head forgets the kept set, and the training samples of the query's label outside it are
  scored on the query with that head (EK-FAC influence, the audit's factors reused): a poison the final model fits so
  well that its gradient vanished loses its fit once the poisons around it are forgotten, and then supports the query
  as they do. Those that support it ``contrast_ratio`` times more than the clean contrast images on the same head,
  and at least as much as the least supporting of the kept samples that pass that same test, are added; rounds
  repeat on the grown set until nothing new is found. (A clean sample the prune kept supports the query no more than
  its class once the poisons are forgotten, so it fails the test and does not lower the threshold into the clean
  class.)
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from delta_influence.datasets import labels_of
from delta_influence.errors import ConfigError, UnsupportedModelError
from delta_influence.examples import evaluating
from delta_influence.models import head_of as classifier_head
from delta_influence.models import penultimate_activations


@dataclass(frozen=True)
class Verification:
    """The settings of the verification stage (see the module's description); every threshold is a fraction of an
    effect measured in the same run.

    Example:
        >>> Verification(keep_fraction=1.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        delta_influence.errors.ConfigError: verification.keep_fraction=1.5 must lie in (0, 1): the share of ...
    """

    steps: int = field(default=100, metadata={"help": "gradient steps of the head per forgetting test"})
    lr: float = field(default=0.03, metadata={"help": "learning rate of those steps (SGD, Nesterov momentum 0.9)"})
    keep_fraction: float = field(default=0.1, metadata={"help": "share of the reference effect a group must reach"})
    contrast_ratio: float = field(
        default=2.0, metadata={"help": "a recovered sample supports the query this many times more than the contrast"}
    )
    min_group: int = field(default=32, metadata={"help": "a guilty group this small is kept without splitting it"})
    rounds: int = field(default=3, metadata={"help": "recovery rounds at most; 0 turns recovery off"})
    seed: int = field(default=0, metadata={"help": "seed of the 2-means splits"})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"verification.steps={self.steps} must be at least 1.")
        if self.lr <= 0:
            raise ConfigError(f"verification.lr={self.lr} must be positive.")
        if not 0 < self.keep_fraction < 1:
            raise ConfigError(
                f"verification.keep_fraction={self.keep_fraction} must lie in (0, 1): the share of the whole flagged "
                "set's effect a group must reach."
            )
        if self.contrast_ratio <= 0:
            raise ConfigError(f"verification.contrast_ratio={self.contrast_ratio} must be positive.")
        if self.min_group < 1:
            raise ConfigError(
                f"verification.min_group={self.min_group} must be at least 1 (1: test down to single samples)."
            )
        if self.rounds < 0:
            raise ConfigError(f"verification.rounds={self.rounds} must be 0 (no recovery) or more.")


@dataclass
class HeadData:
    """What the forgetting tests read: the features feeding the model's head for the training samples (NaN: not
    read), the query and the contrast images, with the head's weights."""

    weight: Tensor  # [K, D]
    bias: Tensor  # [K]
    train: Tensor  # [N, D]
    labels: Tensor  # [N]
    query: Tensor  # [1, D]
    query_label: int
    contrast: Tensor  # [k, D]


@dataclass
class VerificationResult:
    """The verified set and every decision behind it."""

    flagged: Tensor  # sorted indices: the kept groups plus the recovered samples
    kept: Tensor  # sorted indices of the flagged set the prune stage kept, the untested ones included
    dropped: Tensor  # sorted indices of the flagged set that are not in the verified set
    recovered: Tensor  # sorted indices recovery added (samples the rule missed, or that the prune dropped)
    reference_effect: float  # the tested samples' effect (all but the untested), against which groups are judged
    threshold: float = 0.0  # the effect a group needed to be guilty
    groups: list[dict] = field(default_factory=list)  # each test: indices, effect, verdict
    # sorted indices kept without a test (flagged on the support floor alone)
    untested: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    rounds: list[dict] = field(default_factory=list)  # each recovery round: candidates' effects and what was added
    query_loss: dict[str, float] = field(default_factory=dict)  # the query's loss before and after forgetting

    def summary(self) -> dict:
        return {
            "reference_effect": self.reference_effect,
            "threshold": self.threshold,
            "kept": len(self.kept),
            "dropped": len(self.dropped),
            "recovered": len(self.recovered),
            "untested": len(self.untested),
            "groups_tested": len(self.groups),
            "recovery_rounds": len(self.rounds),
            "query_loss": self.query_loss,
        }


def head_of(model: nn.Module) -> nn.Linear:
    """The model's last linear layer, which must turn the features into the logits."""
    return classifier_head(
        model, "the verification stage forgets samples in the classifier head (the last linear layer). Turn it off "
        "for this model (DeltaInfluence(verification=None); --detector.verification null)."
    )  # fmt: skip


@torch.no_grad()
def head_data(
    model: nn.Module,
    train_set: Dataset,
    query: Tensor,
    query_label: int,
    contrast: Tensor,
    device: torch.device | str,
    rows: Optional[Tensor] = None,
) -> HeadData:
    """The head's weights and the features feeding it for every training sample (or the ``rows``, e.g.
    ``retain_rows``; the others' features are NaN, and a test that reads one fails), the query and the contrast
    images, checking that the head alone turns features into the model's logits."""
    head = head_of(model)
    images = torch.cat([query[None], contrast.to(query.dtype)])
    features = penultimate_activations(model, TensorDataset(images, torch.zeros(len(images))), device)
    with evaluating(model, torch.device(device)):
        logits = model(images.to(device)).float().cpu()
    if head.bias is None:
        raise UnsupportedModelError(
            f"the last linear layer of {type(model).__name__} has no bias; the verification stage retrains a head with "
            "one. Turn it off for this model (DeltaInfluence(verification=None); --detector.verification null)."
        )
    weight, bias = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()
    features = features.float()
    tolerance = max(1e-3, 50 * torch.finfo(head.weight.dtype).eps)  # the head's own precision (half, bfloat16)
    if not torch.allclose(features @ weight.T + bias, logits, atol=tolerance, rtol=tolerance):
        raise UnsupportedModelError(
            f"the last linear layer of {type(model).__name__} does not produce the logits on its own (something comes "
            "after it): the verification stage retrains that layer. Turn it off for this model "
            "(DeltaInfluence(verification=None); --detector.verification null)."
        )
    if rows is None:
        train = penultimate_activations(model, train_set, device).float()
    else:
        read = penultimate_activations(model, Subset(train_set, rows.tolist()), device).float()
        train = read.new_full((len(train_set), read.shape[1]), float("nan")).index_copy_(0, rows, read)
    return HeadData(weight, bias, train, labels_of(train_set), features[:1], query_label, features[1:])


def retain_rows(labels: Tensor, query_label: int, seed: int) -> Tensor:
    """The training samples whose features the tests read when every group they forget lies within the query's
    label: that label's samples and the draw of others that ``_retain`` makes from them (the same whatever the
    group, save its length)."""
    return _retain(labels, query_label, labels.new_zeros(0), seed)


def forget_in_head(data: HeadData, forget: Tensor, retain: Tensor, settings: Verification) -> tuple[Tensor, Tensor]:
    """A copy of the head trained for ``settings.steps`` full-batch steps: the ``forget`` samples toward uniform
    predictions, the ``retain`` samples toward their labels. Returns its weight and bias."""
    weight = data.weight.clone().requires_grad_(True)
    bias = data.bias.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([weight, bias], lr=settings.lr, momentum=0.9, nesterov=True)
    forget_x, retain_x, retain_y = data.train[forget], data.train[retain], data.labels[retain]
    if forget_x.isnan().any() or retain_x.isnan().any():
        raise ValueError(
            "the head's features of some samples are NaN: not read (head_data's rows; read them all) or the model's "
            "outputs are not finite."
        )
    with torch.enable_grad():  # also when the audit is called inside a no-grad block
        for _ in range(settings.steps):
            optimizer.zero_grad()
            loss = -F.log_softmax(forget_x @ weight.T + bias, dim=-1).mean()  # cross-entropy to the uniform label
            loss = loss + F.cross_entropy(retain_x @ weight.T + bias, retain_y)
            loss.backward()
            optimizer.step()
    return weight.detach(), bias.detach()


class _Tester:
    """Forgets groups in a copy of the head and measures the query's loss rise over the contrast's."""

    def __init__(self, data: HeadData, retain: Tensor, settings: Verification) -> None:
        self.data, self.retain, self.settings = data, retain, settings
        self.before = self.losses(data.weight, data.bias)

    def losses(self, weight: Tensor, bias: Tensor) -> tuple[float, float]:
        """The query's loss and the contrast images' mean loss (both against the query's label) under a head."""
        label = torch.tensor([self.data.query_label])
        query = F.cross_entropy(self.data.query @ weight.T + bias, label).item()
        contrast = F.cross_entropy(self.data.contrast @ weight.T + bias, label.expand(len(self.data.contrast)))
        return query, contrast.item()

    def effect(self, group: Tensor) -> float:
        """The query's loss rise minus the contrast's when the head forgets ``group``."""
        query, contrast = self.losses(*forget_in_head(self.data, group, self.retain, self.settings))
        return (query - self.before[0]) - (contrast - self.before[1])


Support = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``support(weight, bias, indices)``: ``[1 + k, len(indices)]``, each indexed training sample's influence on the query
(row 0) and on the k clean contrast images, for the model with its head replaced by ``(weight, bias)``."""


def verify(
    data: HeadData,
    flagged: Tensor,
    profiles: Tensor,
    candidates: Tensor,
    support: Support,
    settings: Verification = Verification(),
    progress: bool = True,
    untested: Optional[Tensor] = None,
) -> VerificationResult:
    """Prunes ``flagged`` by forgetting its parts in the head, then recovers the ``candidates`` that support the query
    once the head forgets the kept set.

    Args:
        data: The head's weights and the features of the training set, query and contrast (``head_data``).
        flagged: Sorted indices the decision rule flagged.
        profiles: ``[len(flagged), R]``, what the flagged set is split by: each sample's influence scores on the
            query, its copies and the contrast.
        candidates: Indices recovery may add (e.g. the training samples of the query's label); kept ones are skipped.
        support: Scores training samples on the query under a head that forgot a group (see ``Support``).
        settings: The stage's settings.
        progress: Show a progress bar over the forgetting tests.
        untested: ``[len(flagged)]`` bool, the samples flagged on evidence forgetting in the head cannot judge (the
            support floor's): they are kept without a test, and the prune judges the others against the effect of
            forgetting all of those.

    Returns:
        The verified set, what was kept, dropped and recovered, and every test's evidence.
    """
    if len(profiles) != len(flagged):
        raise ConfigError(f"profiles has {len(profiles)} rows for {len(flagged)} flagged samples; give one each.")
    if untested is not None and (untested.dtype != torch.bool or untested.shape != flagged.shape):
        raise ConfigError(
            f"untested has dtype {untested.dtype} and shape {tuple(untested.shape)}; expected bool "
            f"{tuple(flagged.shape)}."
        )
    if not len(data.contrast):
        raise ConfigError("the verification stage measures the query against clean contrast images; none were given.")
    untested = torch.zeros(len(flagged), dtype=torch.bool) if untested is None else untested
    tested = flagged[~untested]
    tester = _Tester(data, _retain(data.labels, data.query_label, flagged, settings.seed), settings)
    reference = tester.effect(tested) if len(tested) else 0.0
    result = VerificationResult(flagged, flagged, flagged[:0], flagged[:0], reference, untested=flagged[untested])
    result.query_loss = {"before": tester.before[0]}
    if not len(tested) or not math.isfinite(reference) or reference <= 0:
        result.query_loss["after"] = result.query_loss["before"]
        return result  # forgetting the tested samples does not weaken the query: nothing to judge their parts against
    with tqdm(desc="verification: forgetting tests", unit="test", disable=not progress, leave=False) as bar:
        result.threshold = threshold = settings.keep_fraction * reference
        profiles = F.normalize(profiles[~untested].float(), dim=1)
        pruned = _prune(tester, tested, profiles, threshold, result.groups, bar)
        result.kept = torch.cat([pruned, flagged[untested]]).sort().values
        chosen, forgotten = result.kept, None  # the head that forgot ``chosen``, once a round has made it
        for _ in range(settings.rounds):
            pending = candidates[~torch.isin(candidates, chosen)]
            added, forgotten = _recover(data, chosen, pending, support, settings, result.rounds)
            bar.update()
            if not len(added):
                break
            chosen, forgotten = torch.cat([chosen, added]).sort().values, None
    result.dropped = flagged[~torch.isin(flagged, chosen)]  # not in the verified set
    result.recovered = chosen[~torch.isin(chosen, result.kept)]  # added by recovery (new, or dropped by the prune)
    result.flagged = chosen
    if forgotten is None:
        forgotten = forget_in_head(
            data, chosen, _retain(data.labels, data.query_label, chosen, settings.seed), settings
        )
    result.query_loss["after"] = tester.losses(*forgotten)[0]
    return result


def _prune(
    tester: _Tester, flagged: Tensor, profiles: Tensor, threshold: float, groups: list[dict], bar: tqdm
) -> Tensor:
    """Group testing over 2-means splits of the flagged set: a part whose forgetting leaves the query as it was
    holds no poison and is dropped; a guilty part is split again until it has at most ``min_group`` samples, then
    kept; a guilty group neither of whose parts is guilty alone is kept whole. Returns the kept indices, sorted."""
    kept: list[Tensor] = []
    stack = [torch.arange(len(flagged))]  # positions in the flagged set; every node on it was found guilty
    while stack:
        node = stack.pop()
        if len(node) <= tester.settings.min_group:
            kept.append(node)
            continue
        guilty = []
        for part in _split(profiles[node], tester.settings.seed):
            effect = tester.effect(flagged[node[part]])
            bar.update()
            groups.append({"indices": flagged[node[part]].tolist(), "effect": effect, "guilty": effect >= threshold})
            if effect >= threshold:
                guilty.append(node[part])
        stack += guilty
        if not guilty:  # the node was guilty, neither part is alone: what it holds acts together, so it is kept
            kept.append(node)
    return flagged[torch.cat(kept).sort().values] if kept else flagged[:0]


def _recover(
    data: HeadData, chosen: Tensor, pending: Tensor, support: Support, settings: Verification, rounds: list[dict]
) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
    """One recovery round: forgets ``chosen`` and returns the ``pending`` samples that now support the query more
    than ``contrast_ratio`` times the contrast and at least as much as the least supporting of the chosen ones that
    pass the same test (all of them when none does: a clean sample the prune kept does not lower the bar), with
    the head that forgot them (``None`` when there was nothing to do)."""
    if not len(chosen) or not len(pending):
        return pending[:0], None
    weight, bias = forget_in_head(data, chosen, _retain(data.labels, data.query_label, chosen, settings.seed), settings)
    scores = support(weight, bias, torch.cat([pending, chosen]))
    query, contrast = scores[0], scores[1:].mean(dim=0)
    specific = query > settings.contrast_ratio * contrast.abs()
    bar = specific[len(pending) :] if specific[len(pending) :].any() else torch.ones(len(chosen), dtype=torch.bool)
    threshold = query[len(pending) :][bar].min().item()
    added = pending[(query[: len(pending)] >= threshold) & specific[: len(pending)]]
    rounds.append({"indices": pending.tolist(), "support": query[: len(pending)].tolist(),
                   "contrast": contrast[: len(pending)].tolist(), "threshold": threshold,
                   "threshold_from": int(bar.sum()), "added": added.tolist()})  # fmt: skip
    return added, (weight, bias)


def _retain(labels: Tensor, query_label: int, forget: Tensor, seed: int) -> Tensor:
    """What stays correct while the head forgets ``forget``: every other training sample of the query's label, and as
    many of the other labels, drawn at random (seeded)."""
    outside = torch.ones(len(labels), dtype=torch.bool)
    outside[forget] = False
    same = outside & (labels == query_label)
    others = torch.nonzero(outside & ~same).flatten()
    drawn = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[: int(same.sum())]
    return torch.cat([torch.nonzero(same).flatten(), others[drawn]]).sort().values


def _split(profiles: Tensor, seed: int) -> list[Tensor]:
    """Two parts of a group by 2-means; a group 2-means cannot split (identical points) is halved in order."""
    with warnings.catch_warnings():  # identical points: 2-means finds one cluster, and the group is halved below
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = torch.as_tensor(KMeans(n_clusters=2, n_init=4, random_state=seed).fit_predict(profiles.numpy()))
    parts = [torch.nonzero(labels == k).flatten() for k in (0, 1)]
    if min(len(part) for part in parts) == 0:
        half = len(profiles) // 2
        parts = [torch.arange(half), torch.arange(half, len(profiles))]
    return parts
