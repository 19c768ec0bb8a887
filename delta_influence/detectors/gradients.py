"""AGPD, activation-gradient poisoned-sample detection (Yuan et al., ICLR 2025): the gradients of each sample's own
logit with respect to the model's activations, compared with clean images of the same label."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from delta_influence.datasets import labels_of
from delta_influence.detectors.base import Detection, DetectionInput, Detector, clean_sample, require
from delta_influence.errors import ConfigError, UnsupportedModelError
from delta_influence.examples import evaluating

EDGES = torch.linspace(0, 1, 100)  # the histograms of the closeness ratio whose change stops the filtering (99 bins)
POOL = 5  # clean images drawn for each one used: the model must classify those used right


@dataclass(frozen=True)
class AGPD(Detector):
    """Activation-gradient poisoned-sample detection, as the authors' code in BackdoorBench does it.

    1. Each sample's gradient of its own label's logit with respect to the output of every convolution, averaged
       over the image (one forward and backward pass over the training set), and the mean of the same gradients of
       ``clean_images`` clean held-out images, an equal share of each label, all classified right by the model.
    2. Per label and layer, the dispersion of the gradients' directions: each sample's cosine to the clean mean and to
       the label's least clean-like sample (the anchor). A target label is one whose dispersion is an outlier among
       the labels (a one-sided median-absolute-deviation index above e^2 in the layer where it is largest; else the
       labels with dispersion above 0.3 in the layer, among the last ones, that has most of them). None: no attack.
    3. In each target label, samples join the anchor's group round by round (those whose ratio of distance to the
       group over distance to the group plus distance to the clean mean is within ``tau`` of the round's smallest,
       min-max scaled); the rounds stop counting where the ratio's histogram over those left stops changing (the
       window of ``window`` rounds with the smallest mean plus 5 standard deviations of the Jensen-Shannon distance
       between consecutive histograms). The group before that window is flagged.

    ``tau`` has no default in the authors' code (their script needs it as an argument); 0.05 is this project's. The
    authors redraw the clean images for each layer; here one draw serves every layer. On the same gradients, the
    filtering flags the same samples as the authors' code (docs/decisions/detectors.md).
    """

    clean_images: int = 100  # the authors': 10 per class on CIFAR-10
    tau: float = 0.05
    window: int = 10
    batch_size: int = 256
    seed: int = 0
    name: str = "agpd"

    def __post_init__(self) -> None:
        if not 0 < self.tau < 1 or self.window < 1 or self.clean_images < 1:
            raise ConfigError(
                f"tau={self.tau} must lie in (0, 1), window={self.window} and clean_images={self.clean_images} be at "
                "least 1."
            )

    def check_model(self, model: nn.Module) -> None:
        if not any(isinstance(module, nn.Conv2d) for module in model.modules()):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no nn.Conv2d layer: AGPD reads the gradients of convolutions' outputs."
            )

    def _detect(self, inputs: DetectionInput) -> Detection:
        labels = labels_of(inputs.train_set)
        held_out = labels_of(require(inputs.clean_set, f"{self.clean_images} clean held-out images", self.name))
        smallest = int(held_out.bincount()[held_out.unique()].min())  # draw up to POOL times what is used
        pool = clean_sample(
            inputs, min(POOL * self.clean_images, smallest * len(held_out.unique())), self.seed, self.name
        )
        train = self.activation_gradients(inputs.model, inputs.train_set, inputs.device)
        held, held_labels, right = self.activation_gradients(inputs.model, pool, inputs.device, correct_only=True)
        per_label = max(1, self.clean_images // len(labels.unique()))
        references = {}
        for label in labels.unique().tolist():
            members = torch.nonzero(right & (held_labels == label)).flatten()[:per_label]  # the authors': those right
            if not len(members):
                raise ConfigError(
                    f"the model classifies none of the {int((held_labels == label).sum())} clean images of label "
                    f"{label} it was given right: AGPD needs some; give it more (clean_images={self.clean_images} "
                    "now)."
                )
            references[label] = [layer[members].mean(dim=0) for layer in held]
        dispersion = torch.zeros(len(train), int(labels.max()) + 1)  # [layer, label]
        for label, reference in references.items():
            members = labels == label
            for layer, gradients in enumerate(train):
                dispersion[layer, label] = label_dispersion(gradients[members], reference[layer])
        layer, targets = target_labels(dispersion, [label for label in references])
        suspicion = torch.zeros(len(labels))
        flagged = []
        for label in targets:
            members = torch.nonzero(labels == label).flatten()
            group, order = self.filter(train[layer][members], references[label][layer])
            suspicion[members] = 1 - order.float() / len(members)  # joined the anchor's group early: suspicious
            flagged.append(members[group])
        flagged = torch.cat(flagged) if flagged else torch.zeros(0, dtype=torch.long)
        info = {"layer": float(layer), "targets": float(len(targets))}
        return Detection(self.name, flagged, suspicion, info=info)

    def activation_gradients(self, model: nn.Module, dataset: Dataset, device, correct_only: bool = False):
        """Per convolution, each sample's gradient of its label's logit with respect to the convolution's output,
        averaged over height and width: a list of ``[N, channels]``. With ``correct_only``, also the labels and
        whether the model classifies each sample right."""
        device = torch.device(device)
        convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
        outputs: list[Tensor] = []
        hooks = [
            conv.register_forward_hook(lambda module, args, output: outputs.append(output)) for conv in convolutions
        ]
        gradients: list[list[Tensor]] = [[] for _ in convolutions]
        labels, right = [], []
        try:
            with evaluating(model, device):
                for images, targets in DataLoader(dataset, batch_size=self.batch_size):
                    outputs.clear()
                    images, targets = images.to(device), torch.as_tensor(targets).long().to(device)
                    with torch.enable_grad():
                        logits = model(images)
                        own = logits.gather(1, targets[:, None]).sum()  # samples do not mix in eval mode
                        grads = torch.autograd.grad(own, outputs)
                    for layer, grad in enumerate(grads):
                        gradients[layer].append(grad.mean(dim=(2, 3)).detach().cpu())
                    labels.append(targets.cpu())
                    right.append((logits.argmax(1) == targets).cpu())
        finally:
            for hook in hooks:
                hook.remove()
        gradients = [torch.cat(layer) for layer in gradients]
        if correct_only:
            return gradients, torch.cat(labels), torch.cat(right)
        return gradients

    def filter(self, gradients: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """Within a target label (``gradients`` ``[n, channels]``, the clean mean ``reference``): the positions of the
        flagged samples, and the round each sample joined the anchor's group (0: the anchor)."""
        to_clean = F.cosine_similarity(gradients, reference[None], dim=1)
        count = len(gradients)
        joined = torch.full((count,), count, dtype=torch.long)
        joined[to_clean.argmin()] = 0
        histograms, rounds = [], 0
        while (joined == count).any():
            rounds += 1
            rest = torch.nonzero(joined == count).flatten()
            group = gradients[joined < count].mean(dim=0)
            far_from_group = 1 - F.cosine_similarity(gradients[rest], group[None], dim=1)
            ratio = far_from_group / (far_from_group + 1 - to_clean[rest]).clamp_min(1e-12)
            scaled = (ratio - ratio.min()) / (ratio.max() - ratio.min()).clamp_min(1e-12)
            joins = scaled <= self.tau
            joined[rest[joins]] = rounds
            # the ratios of those left, still against the round's group (an empty rest: no histogram)
            histograms.append(_histogram(ratio[~joins]) if (~joins).any() else None)
        change = torch.tensor([1.0 if b is None else _js_distance(a, b) for a, b in zip(histograms, histograms[1:])])
        stop = quietest_window(change, self.window) + 1  # the rounds before the histograms settle
        return torch.nonzero(joined < stop).flatten(), joined


def label_dispersion(gradients: Tensor, reference: Tensor) -> Tensor:
    """How spread a label's gradient directions are: the root mean square difference between each sample's cosine to
    the clean mean and its cosine to the label's least clean-like sample."""
    to_clean = F.cosine_similarity(gradients, reference[None], dim=1)
    anchor = to_clean.argmin()
    to_anchor = F.cosine_similarity(gradients, gradients[anchor][None], dim=1)
    others = torch.arange(len(gradients)) != anchor
    return (to_clean[others] - to_anchor[others]).norm() / math.sqrt(len(gradients))


def target_labels(dispersion: Tensor, labels: list[int]) -> tuple[int, list[int]]:
    """The layer to filter in and the target labels, from each layer's dispersion of each label."""
    values = dispersion[:, labels]
    median = values.quantile(0.5, dim=1, keepdim=True)  # of an even count: the mean of the two middle values
    spread = 1.4826 * ((values - median).abs().quantile(0.5, dim=1, keepdim=True) + 1e-6)
    index = ((values - median) / spread).clamp_min(0)  # one-sided: only labels more dispersed than most
    if index.max() >= math.e**2:
        layer = int(index.max(dim=1).values.argmax())
        return layer, [labels[i] for i in torch.nonzero(index[layer] > math.e**2).flatten().tolist()]
    late = list(range(len(values)))[-4:-1] or list(range(len(values)))
    counts = [(int((values[layer] > 0.3).sum()), layer) for layer in late]
    most, layer = max(counts, key=lambda pair: (pair[0], -pair[1]))
    return layer, [labels[i] for i in torch.nonzero(values[layer] > 0.3).flatten().tolist()] if most else []


def _histogram(values: Tensor) -> Tensor:
    """The counts of ``values`` in the 99 bins between ``EDGES`` (the last bin holds 1.0 too)."""
    bins = torch.bucketize(values.clamp(0, 1), EDGES[1:-1], right=True)
    return torch.bincount(bins, minlength=len(EDGES) - 1).float()


def _js_distance(p: Tensor, q: Tensor) -> float:
    """The Jensen-Shannon distance between two histograms (base 2, 0 to 1)."""
    p, q = p / p.sum().clamp_min(1e-12), q / q.sum().clamp_min(1e-12)
    m = (p + q) / 2

    def kl(a: Tensor, b: Tensor) -> Tensor:
        inside = a > 0
        return (a[inside] * (a[inside] / b[inside]).log2()).sum()

    return float(((kl(p, m) + kl(q, m)) / 2).clamp_min(0).sqrt())


def quietest_window(change: Tensor, window: int) -> int:
    """Where the window of ``window`` consecutive values with the smallest mean + 5 standard deviations starts (0
    when there are fewer values than a window)."""
    if len(change) <= window:
        return 0
    windows = change.unfold(0, window, 1)
    return int((windows.mean(dim=1) + 5 * windows.std(dim=1)).argmin())
