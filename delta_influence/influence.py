"""EK-FAC influence of every training sample on every query, through kronfluence, in one pass over the data."""

import copy
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from kronfluence.utils.state import State
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from delta_influence.cache import new_digest, update_digest
from delta_influence.errors import ConfigError, UnsupportedModelError
from delta_influence.evidence import AuditView, Evidence
from delta_influence.quiet import harmless_warnings_hidden

Strategy = Literal["ekfac", "kfac", "diagonal", "identity"]
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


class ClassificationTask(Task):
    """Summed cross-entropy as the training loss; the query label's margin as the measurement.

    With ``sample=True`` the training loss uses labels drawn from the model's own predictions, so that the fitted
    curvature is the true Fisher. The measurement is minus the margin (logit of the label minus the logsumexp of
    the other logits), so a training sample scores positive when training on it raises the query label's margin:
    poisons score strongly positive on the original query.
    """

    def compute_train_loss(self, batch: tuple[Tensor, Tensor], model: nn.Module, sample: bool = False) -> Tensor:
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.distributions.Categorical(logits=logits.detach()).sample()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch: tuple[Tensor, Tensor], model: nn.Module) -> Tensor:
        inputs, labels = batch
        return -label_margins(model(inputs), labels).sum()


def label_margins(logits: Tensor, labels: Tensor) -> Tensor:
    """Logit of each row's label minus the logsumexp of the row's other logits.

    Example:
        >>> label_margins(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
        tensor([2.])
    """
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).logsumexp(dim=1)
    return own - others


@dataclass
class InfluenceScores(Evidence):
    """Scores ``[Q, N]`` of N training samples on Q queries, the factors they came from, and how long each stage
    took. As a detector's evidence it names the factors in the audit's summary."""

    scores: Tensor
    factors_name: str
    factors_reused: bool
    timings: dict[str, float] = field(default_factory=dict)

    def write(self, folder: Path, view: AuditView) -> None:
        """Nothing beyond the detection's own ``scores.pt``."""

    def summary(self) -> dict[str, object]:
        return {"factors": self.factors_name, "factors_reused": self.factors_reused}


class InfluenceAnalysis:
    """One kronfluence analysis of a model: fitted factors, cached on disk by the model's weights and data.

    kronfluence rewraps the model it is given; this class only ever hands it a deep copy.

    Args:
        model: The trained classifier; its forward returns logits. It is not modified.
        train_set: The training set in evaluation form: ``(input, label)`` pairs, fixed order, no augmentation.
        output_dir: Where kronfluence keeps its factors; reused across runs on the same weights and data.
        strategy: kronfluence's Hessian approximation.
        device: Where to compute; ``cpu`` or a CUDA device.
        train_batch_size: Training samples per batch when fitting factors and scoring.
        num_workers: Data loader workers.
        damping: kronfluence's damping factor; ``None`` lets kronfluence pick it from the factors.
        seed: Seeds the labels that the true Fisher samples from the model's predictions while fitting, and the
            sample of ``factor_examples``.
        factor_examples: How many training samples the factor fits (covariance, eigen-corrections) see: a seeded
            random sample; ``None``: all of them. Scores are always computed on every sample.
        factors_name: Score with the factors fitted under this name (another analysis's ``factors_name``, in the same
            ``output_dir``) instead of this model's own: an approximation for a model that differs from the one they
            were fitted on only a little (e.g. in its last layer).
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        output_dir: str | Path,
        strategy: Strategy = "ekfac",
        device: torch.device | str = "cpu",
        train_batch_size: int = 128,
        num_workers: int = 0,
        damping: Optional[float] = None,
        seed: int = 0,
        factor_examples: Optional[int] = None,
        factors_name: Optional[str] = None,
    ) -> None:
        check_strategy(strategy)
        check_factor_examples(factor_examples)
        check_trackable(model)
        self.train_set = train_set
        self.factor_set = train_set
        if factor_examples is not None and factor_examples < len(train_set):
            generator = torch.Generator().manual_seed(seed)
            chosen = torch.randperm(len(train_set), generator=generator)[:factor_examples].sort().values
            self.factor_set = Subset(train_set, chosen.tolist())
        self.strategy = strategy
        self.train_batch_size = train_batch_size
        self.damping = damping
        self.seed = seed
        self.task = ClassificationTask()
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.factor_args = FactorArguments(strategy=strategy)
        settings = {  # with the weights and every sample in order: everything that changes the factors
            "factor_args": self.factor_args.to_str_dict(),
            "kronfluence": version("kronfluence"),
            "task": f"{type(self.task).__module__}.{type(self.task).__qualname__}",
            "fisher_seed": seed,
            "batch_size": train_batch_size,  # the true Fisher draws its labels batch by batch
        }
        if self.factor_set is not train_set:
            settings["factor_examples"] = len(self.factor_set)
        self.factors_name = factors_name or f"{strategy}_{fingerprint(model, train_set, settings)}"
        prepared = prepare_model(copy.deepcopy(model), self.task)
        with _this_process_only():
            self.analyzer = Analyzer(
                analysis_name="delta_influence",
                model=prepared,
                task=self.task,
                cpu=self.device.type == "cpu",
                output_dir=str(self.output_dir),
            )
        self.analyzer.state.device = self.device  # exactly the caller's device (e.g. the trainer's cuda:1)
        self.analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=num_workers))
        self.timings: dict[str, float] = {}  # seconds of each stage of the last fit

    def fit_factors(self) -> bool:
        """Fits the factors unless a finished set for these weights, data and settings is on disk; returns whether
        reused.

        The true Fisher samples labels from the model's predictions: the analysis's ``seed`` seeds that draw (the
        caller's random state is left as it was), so that the same weights and data give the same factors in any
        process."""
        final = self.analyzer.factors_output_dir(self.factors_name)
        if final.exists():
            return True
        # fit under a temporary name and rename when complete, so an interrupted fit is never taken as finished
        partial_name = f"{self.factors_name}.partial"
        fit = {"factors_name": partial_name, "factor_args": self.factor_args, "overwrite_output_dir": True}
        passes = {"dataset": self.factor_set, "per_device_batch_size": self.train_batch_size}
        stages = {  # kronfluence's fit_all_factors, stage by stage, so that each is timed
            "covariance_s": lambda: self.analyzer.fit_covariance_matrices(**fit, **passes),
            "eigendecomposition_s": lambda: self.analyzer.perform_eigendecomposition(**fit),
            "lambda_s": lambda: self.analyzer.fit_lambda_matrices(**fit, **passes),
        }
        with harmless_warnings_hidden(), torch.random.fork_rng(devices=_cuda_devices(self.device)):
            torch.manual_seed(self.seed)
            for stage, run in stages.items():
                start = time.perf_counter()
                run()
                self.timings[stage] = time.perf_counter() - start
        self.analyzer.factors_output_dir(partial_name).rename(final)
        return False

    def pairwise_scores(self, queries: Dataset, query_batch_size: Optional[int] = None) -> Tensor:
        """Scores ``[len(queries), N]`` of every training sample on every query.

        kronfluence makes one pass over the training set per batch of queries, so the default puts all queries in
        one batch: one pass in all.
        """
        scores_name = f"tmp_{uuid.uuid4().hex}"
        try:
            with harmless_warnings_hidden():
                self.analyzer.compute_pairwise_scores(
                    scores_name=scores_name,
                    factors_name=self.factors_name,
                    query_dataset=queries,
                    train_dataset=self.train_set,
                    per_device_query_batch_size=query_batch_size or len(queries),
                    per_device_train_batch_size=self.train_batch_size,
                    score_args=ScoreArguments(damping_factor=self.damping),
                    overwrite_output_dir=True,
                )
            return self.analyzer.load_pairwise_scores(scores_name)["all_modules"].float().cpu()
        finally:
            shutil.rmtree(self.analyzer.scores_output_dir(scores_name), ignore_errors=True)


@contextmanager
def _this_process_only() -> Iterator[None]:
    """kronfluence keeps one process-wide state, made on first use, with the device and, when ``LOCAL_RANK`` is set
    on a GPU machine, a distributed setup over every process. Each analysis starts it afresh, in this process alone:
    under DDP one rank audits while the others wait, and a later analysis may use another device."""
    State._reset_state()
    local_rank = os.environ.pop("LOCAL_RANK", None)
    try:
        yield
    finally:
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank


def _cuda_devices(device: torch.device) -> list[int]:
    """The CUDA device whose random state a seeded block must fork: the current one, for a CUDA device."""
    return [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []


def check_strategy(strategy: str) -> None:
    """The one check of a strategy name (every influence setting and analysis calls it)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r} is not known to kronfluence; use one of {', '.join(STRATEGIES)}.")


def check_factor_examples(factor_examples: Optional[int]) -> None:
    """The one check of the factor fits' sample size."""
    if factor_examples is not None and factor_examples < 1:
        raise ConfigError(f"factor_examples={factor_examples} must be at least 1, or null for every sample.")


def check_trackable(model: nn.Module) -> None:
    """Raises ``UnsupportedModelError`` (a ``TypeError``) when the model has no layer that kronfluence tracks."""
    if not any(isinstance(module, (nn.Linear, nn.Conv2d)) for module in model.modules()):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer, the only layers kronfluence tracks; "
            "influence needs a model built from them."
        )


def compute_influence_scores(
    model: nn.Module,
    train_set: Dataset,
    queries: Dataset,
    output_dir: str | Path,
    strategy: Strategy = "ekfac",
    device: torch.device | str = "cpu",
    train_batch_size: int = 128,
    query_batch_size: Optional[int] = None,
    num_workers: int = 0,
    damping: Optional[float] = None,
    seed: int = 0,
    factor_examples: Optional[int] = None,
) -> InfluenceScores:
    """Fits (or reuses) the factors and scores every training sample on every query in one pass.

    Returns:
        Scores ``[len(queries), len(train_set)]``; positive means training on the sample raises the query label's
        margin.
    """
    start = time.perf_counter()
    analysis = InfluenceAnalysis(
        model, train_set, output_dir, strategy, device, train_batch_size, num_workers, damping, seed, factor_examples
    )  # fmt: skip
    reused = analysis.fit_factors()
    fitted = time.perf_counter()
    scores = analysis.pairwise_scores(queries, query_batch_size)
    done = time.perf_counter()
    return InfluenceScores(
        scores=scores,
        factors_name=analysis.factors_name,
        factors_reused=reused,
        timings={"factors_s": fitted - start, **analysis.timings, "scores_s": done - fitted},
    )


def fingerprint(model: nn.Module, train_set: Dataset, settings: dict) -> str:
    """A short hash of everything the factors depend on: the model's weights, every training sample's input and
    label in order, and the fitting ``settings`` (strategy and kronfluence's factor arguments).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0]))
        >>> edited = TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
        >>> model, settings = nn.Linear(2, 2), {"strategy": "ekfac"}
        >>> fingerprint(model, data, settings) == fingerprint(model, edited, settings)
        False
    """
    digest = new_digest(settings)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        update_digest(digest, tensor)
    digest.update(str(len(train_set)).encode())
    for inputs, labels in DataLoader(train_set, batch_size=512):  # in order: index i is sample i
        update_digest(digest, torch.as_tensor(inputs))
        update_digest(digest, torch.as_tensor(labels).long())
    return digest.hexdigest()[:16]
