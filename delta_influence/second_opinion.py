"""The second opinion: a model that never learned the attack looks at the samples the audit flagged.

The corrective fit trains a model without the flagged set, so it never learned the trigger. A dirty-label poison is
an image of another class carrying the attacker's label: that model sees its content and gives its label a low
probability. A clean member of the label that the audit flagged by mistake is an image of its class: the model
recognises it as one. So a flagged sample is given back when the corrected model is as sure of its label as of a
typical clean member: its probability of the sample's own label is at least the ``quantile`` (the median, by default) of
its probabilities of that label on the label's clean test images. Every threshold comes from the same run's model and
test set; why the median: docs/decisions/second-opinion.md.

Clean-label poisons (Witches' Brew) are images of their label, and the corrected model recognises them too: giving them
back would bring the attack back. The correction loop therefore confirms every give-back with a fit without the final
set and undoes it when the query misbehaves again or the attack's success rate rises beyond its noise
(``delta_influence.correction``).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from delta_influence.datasets import labels_of
from delta_influence.errors import ConfigError
from delta_influence.examples import evaluating


@dataclass(frozen=True)
class SecondOpinion:
    """The second opinion's setting: a flagged sample is given back when the corrected model's probability of its label
    is at least the ``quantile`` of that model's probabilities of the label on the clean test images of the label.

    Example:
        >>> SecondOpinion(quantile=1.5)
        Traceback (most recent call last):
        ...
        delta_influence.errors.ConfigError: second_opinion.quantile=1.5 must lie in (0, 1): the share of the label's \
clean test images that the corrected model recognises less than a flagged sample it gives back.
    """

    quantile: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:
            raise ConfigError(
                f"second_opinion.quantile={self.quantile} must lie in (0, 1): the share of the label's clean test "
                "images that the corrected model recognises less than a flagged sample it gives back."
            )


@dataclass
class Opinion:
    """What the corrected model said about each flagged sample: its probability of the sample's own label, the
    threshold of that label (``thresholds``: label -> probability), and which samples it gives back."""

    flagged: Tensor  # [F] indices into the whole training set
    labels: Tensor  # [F] their labels
    probabilities: Tensor  # [F] the corrected model's probability of each one's label
    thresholds: dict[int, float]
    reference: dict[int, list[float]]  # per label: the probabilities on the clean test images it was read from

    @property
    def recognised(self) -> Tensor:
        """[F] bool: the samples given back."""
        limits = torch.tensor([self.thresholds.get(int(label), float("inf")) for label in self.labels])
        return self.probabilities >= limits

    @property
    def given_back(self) -> Tensor:
        return self.flagged[self.recognised]

    @property
    def kept(self) -> Tensor:
        return self.flagged[~self.recognised]

    def summary(self) -> dict:
        return {
            "thresholds": {str(label): value for label, value in self.thresholds.items()},
            "given_back": self.given_back.tolist(),
            "given_back_probabilities": self.probabilities[self.recognised].tolist(),
            "kept": self.kept.tolist(),
            "kept_probabilities": self.probabilities[~self.recognised].tolist(),
        }


@torch.no_grad()
def give_back(
    model: nn.Module,
    train_set: Dataset,
    flagged: Tensor,
    test_set: Dataset,
    settings: SecondOpinion,
    device: torch.device | str = "cpu",
) -> Opinion:
    """The corrected ``model``'s opinion of the ``flagged`` training samples (indices into ``train_set``, in evaluation
    form); each label's threshold is read off the clean ``test_set``'s images of that label. A label without clean test
    images gives nothing back.

    Example:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> _ = model.weight.data.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0]]))  # the content decides the class
        >>> train = torch.utils.data.TensorDataset(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        >>> test = torch.utils.data.TensorDataset(torch.tensor([[1.0, 0.0], [0.9, 0.1]]), torch.tensor([0, 0]))
        >>> give_back(model, train, torch.tensor([0, 1]), test, SecondOpinion()).given_back  # 1: a one labelled 0
        tensor([0])
    """
    flagged = torch.as_tensor(flagged, dtype=torch.long)
    labels = labels_of(Subset(train_set, flagged.tolist())) if len(flagged) else flagged
    probabilities = _own_label_probabilities(model, Subset(train_set, flagged.tolist()), device)
    test_labels = labels_of(test_set)
    thresholds, reference = {}, {}
    for label in labels.unique().tolist():
        members = torch.nonzero(test_labels == label).flatten().tolist()
        if not members:
            continue
        clean = _own_label_probabilities(model, Subset(test_set, members), device)
        thresholds[label] = clean.quantile(settings.quantile).item()
        reference[label] = clean.tolist()
    return Opinion(flagged, labels, probabilities, thresholds, reference)


def _own_label_probabilities(model: nn.Module, dataset: Dataset, device: torch.device | str) -> Tensor:
    """The model's probability of each sample's own label, on the CPU."""
    found = []
    with evaluating(model, torch.device(device)):
        for inputs, labels in DataLoader(dataset, batch_size=512):
            probabilities = model(inputs.to(device)).float().softmax(-1).cpu()
            found.append(probabilities.gather(1, torch.as_tensor(labels).long()[:, None]).squeeze(1))
    return torch.cat(found) if found else torch.zeros(0)


def plot_opinion(opinion: Opinion, path: Path, poisons: Optional[Tensor] = None, title: str = "") -> None:
    """The decision as a picture: the corrected model's probability of their label for the flagged samples (poisons and
    clean samples apart when the poisons are known) against its probabilities on the clean test images of the label,
    with each threshold."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend change for the user

    figure = Figure(figsize=(6.4, 3.6))
    axis = figure.subplots()
    bins = torch.linspace(0, 1, 41).tolist()
    for label, values in opinion.reference.items():
        axis.hist(values, bins=bins, density=True, alpha=0.35, color="tab:green", label=f"clean test images of {label}")
        axis.axvline(opinion.thresholds[label], color="tab:green", linestyle="--", linewidth=1)
    if poisons is not None:
        poison = torch.isin(opinion.flagged, poisons)
        groups = [("flagged poisons", poison, "tab:red"), ("flagged clean samples", ~poison, "tab:blue")]
    else:
        groups = [("flagged samples", torch.ones(len(opinion.flagged), dtype=torch.bool), "tab:blue")]
    for name, members, colour in groups:
        if members.any():
            axis.hist(opinion.probabilities[members].tolist(), bins=bins, density=True, alpha=0.5, color=colour,
                      label=f"{name} ({int(members.sum())})")  # fmt: skip
    axis.set_xlabel("the corrected model's probability of the sample's own label")
    axis.set_ylabel("density")
    axis.set_title(
        title or f"second opinion: {len(opinion.given_back)} of {len(opinion.flagged)} given back", fontsize=9
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
