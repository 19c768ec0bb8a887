"""SCAn, Cognitive Distillation and AGPD against their authors' reference code, on the same victim. The reference files
are executed from the checkouts given (never copied here), with stubs for the few imports they need and these checks do
not use; a check runs when its checkout is given.

    python benchmarks/agreement.py --toolbox <backdoor-toolbox> --cognitive-distillation <CognitiveDistillation> \\
        --backdoorbench <BackdoorBench> [--attack badnets] [--count 100]

- SCAn, vtu81/backdoor-toolbox ``cleansers_tool_box/scan.py``: its ``cleanser()`` on the victim's penultimate features
  (a stub of its ``get_features`` hands them over), as it is and with ``calc_test``'s identity estimate in the Su form
  of its own EM, ``Su (n Su + Se)^-1 sum x`` (the project's); flagged, precision, recall, overlap with the project's
  set, each label's anomaly index (the toolbox's two-sided, cutoff e; the project's one-sided, cutoff e^2).
- Cognitive Distillation, HanxunH/CognitiveDistillation ``detection/cognitive_distillation.py`` (the victim behind its
  normalisation): mask norms of ``--count`` poisons and as many clean training images of the target label, same seed;
  correlation, largest difference, AUROC, and the project's seed-to-seed correlation for scale.
- AGPD, SCLBD/BackdoorBench ``detection_pretrain/agpd_utils.py``, on the project's gradients (compared with the
  reference's own on the target label) and clean means: each layer's dispersion of each label, and the filtering inside
  the target label at each layer (agpd.py's loop, which needs an attack record, retyped around agpd_utils' functions);
  flagged, precision, recall, overlap.

The project's numbers (docs/decisions/detectors.md) were measured against backdoor-toolbox 9d4d909,
CognitiveDistillation 6aba6f9 and BackdoorBench f02e353. All runs on the CPU, where both Cognitive Distillations draw
the same noise from the same seed. The tables are printed and written to results/agreement_<attack>.json.
"""

import dataclasses
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Optional
from unittest import mock

import numpy as np
import torch
from common import RESULTS, load_victim, parse_args, print_table, run_tag
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.transforms import Normalize

from delta_influence.datasets import labels_of
from delta_influence.detectors import AGPD, CognitiveDistillation, DetectionInput, SCAn, clean_sample
from delta_influence.detectors.gradients import POOL, label_dispersion
from delta_influence.metrics import detection_metrics
from delta_influence.models import penultimate_activations

REFERENCES = {  # flag -> the reference file in its checkout
    "toolbox": "cleansers_tool_box/scan.py",
    "cognitive_distillation": "detection/cognitive_distillation.py",
    "backdoorbench": "detection_pretrain/agpd_utils.py",
}


def main() -> None:
    args = parse_args(
        __doc__,
        [
            ("--toolbox", Path, None, "a vtu81/backdoor-toolbox checkout: check SCAn"),
            ("--cognitive-distillation", Path, None, "a HanxunH/CognitiveDistillation checkout: check it"),
            ("--backdoorbench", Path, None, "an SCLBD/BackdoorBench checkout: check AGPD"),
            ("--count", int, 100, "Cognitive Distillation: poisons, and as many clean images of the target label"),
        ],
    )
    files = {flag: getattr(args, flag) / file for flag, file in REFERENCES.items() if getattr(args, flag) is not None}
    if not files:
        raise SystemExit("Give at least one checkout: --toolbox, --cognitive-distillation or --backdoorbench.")
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"Not found: {', '.join(missing)}; give the root of each checkout.")
    cli = load_victim(args)
    model, data = cli.model, cli.datamodule
    results = {}
    if "toolbox" in files:
        results["scan"] = check_scan(files["toolbox"], model, data)
        _print_table("SCAn against backdoor-toolbox's cleanser()", results["scan"])
    if "cognitive_distillation" in files:
        results["cognitive_distillation"] = check_distillation(files["cognitive_distillation"], model, data, args.count)
        _print_table(f"Cognitive Distillation: mask norms of {args.count} poisons and {args.count} clean images of "
                     "the target label", results["cognitive_distillation"])  # fmt: skip
    if "backdoorbench" in files:
        results["agpd"] = check_agpd(files["backdoorbench"], model, data)
        _print_table("AGPD against BackdoorBench: per layer, dispersion, and filtering inside the target label",
                     results["agpd"], hidden=("dispersion", "reference_dispersion"))  # fmt: skip
    path = RESULTS / f"agreement_{args.attack}{run_tag(args)}.json"
    checkouts = {flag: str(getattr(args, flag)) for flag in files}
    path.write_text(json.dumps({"device": "cpu", "checkouts": checkouts, "count": args.count, **results}, indent=2))
    print(f"\nwritten to {path}")


def check_scan(file: Path, model: nn.Module, data) -> list[dict]:
    """The project's SCAn, the toolbox's as it is and the toolbox's in the Su form, on the same features."""
    scan, train = SCAn(), data.eval_train_set
    inputs = DetectionInput(model, train, data.num_classes, clean_set=data.test_set)
    clean = clean_sample(inputs, scan.clean_images, scan.seed, scan.name)
    features = TensorDataset(penultimate_activations(model, train).double(), labels_of(train))
    clean_features = TensorDataset(penultimate_activations(model, clean).double(), labels_of(clean))
    project = scan.detect(inputs)
    runs = {"project": (project.flagged, [project.info[f"anomaly_index_{k}"] for k in range(data.num_classes)])}
    for run, su_form in (("toolbox as is", False), ("toolbox, Su form", True)):
        runs[run] = _toolbox_cleanser(_load(file), features, clean_features, data.num_classes, su_form)
    return [
        {"run": run, **_scores(flagged, data), "overlap": int(torch.isin(flagged, project.flagged).sum()),
         "anomaly_index": index}
        for run, (flagged, index) in runs.items()
    ]  # fmt: skip


def _toolbox_cleanser(toolbox, train: TensorDataset, clean: TensorDataset, num_classes: int, su_form: bool):
    """backdoor-toolbox's ``cleanser()`` on these features: the samples it flags and each label's anomaly index."""
    indices = []

    class Recording(toolbox.SCAn):
        def calc_test(self, X, Su, Se, F, subg, u1, u2):
            if su_form:  # Se' = Su, n Su' + Se' = n Su + Se: its Se' (n Su' + Se')^-1 sum x is Su (n Su + Se)^-1 sum x
                Su, Se = Su + (Se - Su) / len(X), Su
            return np.asarray(super().calc_test(X, Su, Se, F, subg, u1, u2)).item()  # numpy 2 refuses its (1, 1)

        def calc_final_score(self, lc_model=None):
            indices.append(super().calc_final_score(lc_model))  # cleanser() only prints them
            return indices[-1]

    toolbox.SCAn = Recording  # cleanser() looks both up in its module
    toolbox.get_features = lambda loader, model: tuple(tensor.numpy() for tensor in loader.dataset.tensors)
    np.random.seed(2333)  # backdoor-toolbox's default seed (tools.setup_seed), from which its 2-means starts
    flagged = toolbox.cleanser(train, clean, None, num_classes)
    flagged = [i for i in flagged if i < len(train)]  # its off-by-one can flag the first clean image
    return torch.tensor(flagged, dtype=torch.long), indices[-1].tolist()


def check_distillation(file: Path, model: nn.Module, data, count: int) -> list[dict]:
    """The project's mask norms (seeds 0 and 1) and the reference's (seed 0) of the same poisons and clean images."""
    train, labels, poisons, target = _victim_labels(data)
    clean = torch.nonzero((labels == target) & ~torch.isin(torch.arange(len(labels)), poisons)).flatten()
    generator = torch.Generator().manual_seed(0)
    chosen = [group[torch.randperm(len(group), generator=generator)[:count]] for group in (poisons, clean)]
    images = Subset(train, torch.cat(chosen).tolist())
    is_poison = torch.cat([torch.ones(len(chosen[0])), torch.zeros(len(chosen[1]))]).long()
    detector = CognitiveDistillation()
    base = detector.mask_norms(model, images, data.mean, data.std, "cpu")
    norms = {
        "project, seed 0": base,
        "reference, seed 0": _reference_norms(_load(file), detector, model, images, data),
        "project, seed 1": dataclasses.replace(detector, seed=1).mask_norms(model, images, data.mean, data.std, "cpu"),
    }
    return [
        {"run": run, "poison_norm": float(values[is_poison == 1].mean()),
         "clean_norm": float(values[is_poison == 0].mean()), "auroc": roc_auc_score(is_poison, -values),
         "r_to_project_seed_0": float(torch.corrcoef(torch.stack([base, values]))[0, 1]),
         "max_abs_diff": float((values - base).abs().max())}
        for run, values in norms.items()
    ]  # fmt: skip


def _reference_norms(reference, detector: CognitiveDistillation, model: nn.Module, images: Subset, data) -> Tensor:
    """The reference's mask norms with the project's settings, batches and seed (it draws its noise from torch's
    global generator, the project from its own, seeded alike)."""
    distil = reference.CognitiveDistillation(lr=detector.lr, p=1, gamma=detector.gamma, beta=detector.beta,
                                             num_steps=detector.steps, mask_channel=1, norm_only=True)  # fmt: skip
    wrapped = nn.Sequential(Normalize(data.mean, data.std), model)  # the reference's model reads [0, 1] pixels
    mean, std = (torch.as_tensor(value).view(1, -1, 1, 1) for value in (data.mean, data.std))
    pixels = (torch.stack([image for image, _ in images]) * std + mean).clamp(0, 1)
    torch.manual_seed(detector.seed)  # after the images are read: a DataLoader would draw from it
    return torch.cat([distil(wrapped, batch) for batch in pixels.split(detector.batch_size)])


def check_agpd(file: Path, model: nn.Module, data) -> list[dict]:
    """Per layer: the reference's gradients of the target label, every label's dispersion, the target label's
    filtering, by the project and by the reference, on the project's gradients and clean means."""
    stubs = {name: types.ModuleType(name) for name in ("utils", "utils.nCHW_nHWC", "utils.bd_dataset_v2")}
    names = ("dataset_wrapper_with_transform", "xy_iter", "prepro_cls_DatasetBD_v2")  # imported, unused here
    vars(stubs["utils.bd_dataset_v2"]).update(dict.fromkeys(names))
    reference = _load(file, stubs)
    agpd = AGPD()
    train, labels, poisons, target = _victim_labels(data)
    members = torch.nonzero(labels == target).flatten()
    gradients = agpd.activation_gradients(model, train, "cpu")
    inputs = DetectionInput(model, train, data.num_classes, clean_set=data.test_set)
    pool = clean_sample(inputs, POOL * agpd.clean_images, agpd.seed, agpd.name)  # drawn as the detector draws them
    held, held_labels, right = agpd.activation_gradients(model, pool, "cpu", correct_only=True)
    per_label = max(1, agpd.clean_images // data.num_classes)
    chosen = [torch.nonzero(right & (held_labels == k)).flatten()[:per_label] for k in range(data.num_classes)]
    convolutions = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    rows = []
    for layer, (name, ours) in enumerate(zip(convolutions, gradients)):
        means = [held[layer][rows_of_label].mean(dim=0) for rows_of_label in chosen]
        loader = DataLoader(Subset(train, members.tolist()), batch_size=agpd.batch_size)
        theirs = reference.get_all_gradient(loader, "cpu", "resnet18", model, False, name, data.num_classes)
        dispersion = [float(label_dispersion(ours[labels == k], means[k])) for k in range(data.num_classes)]
        their_dispersion = [_reference_dispersion(reference, ours[labels == k].numpy(), means[k].numpy())
                            for k in range(data.num_classes)]  # fmt: skip
        flagged = members[agpd.filter(ours[members], means[target])[0]]
        their_flagged = members[_reference_filter(reference, ours[members].numpy(), means[target].numpy(), agpd.tau)]
        rows.append(
            {"layer": name, "gradient_diff": float(np.abs(theirs - ours[members].numpy()).max()),
             "dispersion_diff": float(np.abs(np.subtract(dispersion, their_dispersion)).max()),
             "dispersion": dispersion, "reference_dispersion": their_dispersion,
             **{f"project_{key}": value for key, value in _scores(flagged, data).items()},
             **{f"reference_{key}": value for key, value in _scores(their_flagged, data).items()},
             "overlap": int(torch.isin(flagged, their_flagged).sum())}
        )  # fmt: skip
    return rows


def _reference_dispersion(reference, gradients: np.ndarray, clean_mean: np.ndarray) -> float:
    """A label's dispersion as agpd.py computes it from agpd_utils' functions."""
    anchor = reference.get_unsimilar_sample_idx(gradients, clean_mean, np.empty(0, int), 1)
    return float(reference.compute_change(gradients, clean_mean, anchor) / np.sqrt(len(gradients)))


def _reference_filter(reference, gradients: np.ndarray, clean_mean: np.ndarray, tau: float) -> Tensor:
    """agpd.py's filtering of one target label around agpd_utils' functions: the positions it flags."""
    group = reference.get_unsimilar_sample_idx(gradients, clean_mean, np.empty(0, int), 1)
    anchor = np.mean(gradients[group], axis=0)
    rates = []
    for i in range(len(gradients)):
        if i not in group:
            to_group = reference.compute_distance(gradients[i], anchor, "cosin")
            to_clean = reference.compute_distance(gradients[i], clean_mean, "cosin")
            rates.append((1 - to_group) / ((1 - to_group) + (1 - to_clean)))
    rounds, changes, bins = [group], [], np.linspace(0, 1, 100)
    while True:
        joined, left, _ = reference.stage1_new(gradients, clean_mean, group, tau, "cosin", len(gradients))
        if len(joined) == 0:
            break
        rounds.append(joined)
        group = np.append(group, joined)
        with np.errstate(all="ignore"):  # the density of an empty histogram
            before, after = (np.histogram(values, bins=bins, density=True)[0] for values in (rates, left))
        changes.append(1 if len(rates) == 0 or len(left) == 0 else jensenshannon(before, after))
        rates = left
    start = reference.find_small_and_smooth_window_start(changes)
    return torch.as_tensor(np.concatenate(rounds[:start]) if start else np.zeros(0), dtype=torch.long)


def _load(file: Path, stubs: Optional[dict[str, types.ModuleType]] = None) -> types.ModuleType:
    """The reference ``file``, executed from its checkout as a fresh module (``stubs`` in sys.modules meanwhile)."""
    spec = importlib.util.spec_from_file_location(f"reference_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, stubs or {}):
        spec.loader.exec_module(module)
    return module


def _victim_labels(data) -> tuple[Dataset, Tensor, Tensor, int]:
    """The training set, its labels, the true poisons and their label (the attack's target)."""
    labels, poisons = labels_of(data.eval_train_set), torch.as_tensor(data.poison_indices)
    return data.eval_train_set, labels, poisons, int(labels[poisons[0]])


def _scores(flagged: Tensor, data) -> dict:
    """How many are flagged, and their precision and recall against the true poisons."""
    metrics = detection_metrics(flagged, len(data.eval_train_set), torch.as_tensor(data.poison_indices))
    return {"flagged": int(metrics["flagged"]), "precision": metrics["precision"], "recall": metrics["recall"]}


def _print_table(title: str, rows: list[dict], hidden: tuple[str, ...] = ()) -> None:
    """Prints ``rows`` under ``title``, a column per key but the ``hidden`` ones."""
    print(f"\n{title}")
    print_table(rows, [key for key in rows[0] if key not in hidden])


if __name__ == "__main__":
    main()
