"""EK-FAC influence of every training sample on every query, through kronfluence, in one pass over the data, in one
process or split by data partition across the processes of a distributed run."""

import copy
import gc
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.factor.eigen import lambda_matrices_exist
from kronfluence.score.pairwise import load_pairwise_scores
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from kronfluence.utils.state import State
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from delta_influence.cache import new_digest, update_digest
from delta_influence.errors import ConfigError, UnsupportedModelError
from delta_influence.evidence import AuditView, Evidence
from delta_influence.quiet import harmless_warnings_hidden, interactive, transient_bars

Strategy = Literal["ekfac", "kfac", "diagonal", "identity"]
PARTITION_FILES = "*_data_partition*_module_partition*.safetensors"  # kronfluence's name for a partition's factors
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


class ClassificationTask(Task):
    """Summed cross-entropy as the training loss; the query label's margin as the measurement.

    With ``sample=True`` the training loss uses labels drawn from the model's own predictions, so that the fitted
    curvature is the true Fisher. Each sample's draw depends only on ``seed`` and its index (batches of
    ``(input, label, index)``, see ``Indexed``), so the factors are the same whatever the batch size and however the
    data is split into partitions or processes. The measurement is minus the margin (logit of the label minus the
    logsumexp of the other logits), so a training sample scores positive when training on it raises the query
    label's margin: poisons score strongly positive on the original query.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def compute_train_loss(self, batch: tuple[Tensor, ...], model: nn.Module, sample: bool = False) -> Tensor:
        inputs, labels = batch[0], batch[1]
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = sampled_labels(logits.detach(), batch[2], self.seed)
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch: tuple[Tensor, Tensor], model: nn.Module) -> Tensor:
        inputs, labels = batch
        return -label_margins(model(inputs), labels).sum()


def sampled_labels(logits: Tensor, indices: Tensor, seed: int) -> Tensor:
    """One label per row drawn from ``softmax(logits)`` with a uniform number that depends only on ``seed`` and the
    row's sample index (SplitMix64 of the pair: no random state, the same in any batch or process).

    Example:
        >>> logits = torch.zeros(2, 4)
        >>> pair = sampled_labels(logits, torch.tensor([5, 9]), seed=0)
        >>> bool(pair[1] == sampled_labels(logits[:1], torch.tensor([9]), seed=0)[0])  # sample 9's draw, in any batch
        True
    """
    uniform = torch.from_numpy(_uniform(seed, indices.cpu().numpy())).to(logits.device, torch.float32)
    cumulative = logits.float().softmax(dim=1).cumsum(dim=1)
    return torch.searchsorted(cumulative, uniform[:, None]).squeeze(1).clamp(max=logits.shape[1] - 1)


def _uniform(seed: int, indices: np.ndarray) -> np.ndarray:
    """A number in [0, 1) for each index: SplitMix64's output for the state ``(seed mod 2**32) * 2**32 + index``."""
    state = (np.uint64(seed % 2**32) << np.uint64(32)) + indices.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (state + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


class Indexed(Dataset):
    """``(input, label, index)`` for each sample of ``dataset``; ``indices`` names them (default: their position)."""

    def __init__(self, dataset: Dataset, indices: Optional[list[int]] = None) -> None:
        self.dataset = dataset
        self.indices = indices if indices is not None else list(range(len(dataset)))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Any, Any, int]:
        inputs, label = self.dataset[position][:2]
        return inputs, label, self.indices[position]


class PartitionError(RuntimeError):
    """A process's share of an influence pass failed; every process of the run raises it with that message."""


class DataPartitions:
    """The processes of a ``torch.distributed`` run (Lightning's DDP: gloo on CPUs, NCCL on GPUs) that split the
    passes over the training set by kronfluence's data partitions: process ``rank`` computes partition ``rank`` of the
    covariance, eigen-correction and score passes into a folder of its own, the processes meet after each pass
    (where a failure in any one ends them all with its message), and process 0 aggregates. They share only the output
    folder and the default process group. Process 0 drives the audit; the others follow it through ``serve``."""

    def __init__(self) -> None:
        self.rank, self.count = dist.get_rank(), dist.get_world_size()

    def share(self, value: Any = None) -> Any:
        """Process 0's ``value``, on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run(self, stage: str, work: Callable[[], object]) -> list[float]:
        """Runs this process's share of ``stage``, then waits for the others; returns every process's seconds. A
        share that failed ends every process with a ``PartitionError`` that names it."""
        start, error = time.perf_counter(), None
        try:
            work()
        except BaseException as caught:  # noqa: BLE001 - reported to every process below, then raised
            error = caught  # a signal's exception too: the others must not wait for this process's report
        reports: list[Any] = [None] * self.count
        failure = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(reports, (failure, time.perf_counter() - start))
        if error is not None and not isinstance(error, Exception):
            raise error  # this process was interrupted: it ends as such, the others with its message
        failed = [f"process {rank}: {message}" for rank, (message, _) in enumerate(reports) if message]
        if failed:
            raise PartitionError(f"the audit's {stage} pass failed in {'; '.join(failed)}") from error
        return [seconds for _, seconds in reports]

    def align(self, module: nn.Module) -> None:
        """Gives every process process 0's buffers (batch norm's running statistics: under DDP the last training
        step updates each process's own from its own batch), so that all of them audit the same model."""
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


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
    """Scores ``[Q, N]`` of N training samples on Q queries (NaN: not scored), the factors they came from, and how
    long each stage took. As a detector's evidence it names the factors in the audit's summary."""

    scores: Tensor
    factors_name: str
    factors_reused: bool
    timings: dict[str, float] = field(default_factory=dict)
    process_timings: dict[str, list[float]] = field(default_factory=dict)

    def write(self, folder: Path, view: AuditView) -> None:
        """Nothing beyond the detection's own ``scores.pt``."""

    def summary(self) -> dict[str, object]:
        summary: dict[str, object] = {"factors": self.factors_name, "factors_reused": self.factors_reused}
        if self.process_timings:  # split across processes: each one's seconds of each pass
            summary["process_timings"] = self.process_timings
        return summary


@contextmanager
def _old_objects_frozen() -> Iterator[None]:
    """kronfluence collects garbage (``gc.collect``) several times in every pass, and each collection walks every
    object of the process: 0.2 s a time in a training script with Lightning and its data loaded, about a fifth of a
    score pass on a small model. The objects that exist when the pass starts are set aside from the collector for its
    duration (``gc.freeze``; garbage that the pass makes is collected as before), unless someone already froze some."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
            random sample; ``None``: all of them.
        scored: The training samples ``pairwise_scores`` scores (sorted indices); ``None``: every one. The factors
            are the whole training set's either way.
        factors_name: Score with the factors fitted under this name (another analysis's ``factors_name``, in the same
            ``output_dir``) instead of this model's own: an approximation for a model that differs from the one they
            were fitted on only a little (e.g. in its last layer).
        partitions: Split every pass across the processes of a distributed run (each one makes this same analysis,
            on its own device, with the same weights and data, and ``output_dir`` on a shared file system); only
            process 0 gets the scores.
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
        partitions: Optional[DataPartitions] = None,
        scored: Optional[Tensor] = None,
    ) -> None:
        check_strategy(strategy)
        check_factor_examples(factor_examples)
        check_trackable(model)
        check_scored(scored, len(train_set))
        self.train_set = train_set
        self.score_set = train_set if scored is None else Subset(train_set, scored.tolist())
        self.factor_set = train_set
        chosen = list(range(len(train_set)))
        if factor_examples is not None and factor_examples < len(train_set):
            generator = torch.Generator().manual_seed(seed)
            chosen = torch.randperm(len(train_set), generator=generator)[:factor_examples].sort().values.tolist()
            self.factor_set = Subset(train_set, chosen)
        self.fit_set = Indexed(self.factor_set, chosen)  # the true Fisher's draw depends on each sample's index
        self.partitions = partitions if partitions is not None and partitions.count > 1 else None
        self.strategy = strategy
        self.train_batch_size = train_batch_size
        self.damping = damping
        self.seed = seed
        self.task = ClassificationTask(seed)
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.factor_args = FactorArguments(strategy=strategy)
        settings = {  # with the weights and every sample in order: everything that changes the factors
            "factor_args": self.factor_args.to_str_dict(),
            "kronfluence": version("kronfluence"),
            "task": f"{type(self.task).__module__}.{type(self.task).__qualname__}",
            "fisher_seed": seed,
            "fisher_draw": "per sample",  # not per batch: the batch size and the partitions change nothing
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
                disable_tqdm=not interactive() or (self.partitions is not None and self.partitions.rank != 0),
            )
        self.analyzer.state.device = self.device  # exactly the caller's device (e.g. the trainer's cuda:1)
        self.analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=num_workers))
        self.timings: dict[str, float] = {}  # seconds of each stage of the last fit
        self.process_timings: dict[str, list[float]] = {}  # with partitions: each process's seconds of each stage

    @_old_objects_frozen()
    def fit_factors(self) -> bool:
        """Fits the factors unless a finished set for these weights, data and settings is on disk; returns whether
        reused.

        The true Fisher samples labels from the model's predictions: the analysis's ``seed`` and each sample's index
        decide that draw (the caller's random state is left as it was), so that the same weights and data give the
        same factors in any process and under any split into partitions."""
        final = self.analyzer.factors_output_dir(self.factors_name)
        cached = final.exists()
        if self.partitions is not None:  # process 0's answer, so that every process takes the same steps
            cached = self.partitions.share(cached)
        if cached:
            return True
        # fit under a temporary name and rename when complete, so an interrupted fit is never taken as finished
        partial_name = f"{self.factors_name}.partial"
        if self.partitions is not None:
            self._fit_partitioned(partial_name, self.factors_name)
        else:
            fit = {"factors_name": partial_name, "factor_args": self.factor_args, "overwrite_output_dir": True}
            passes = {"dataset": self.fit_set, "per_device_batch_size": self.train_batch_size}
            stages = {  # kronfluence's fit_all_factors, stage by stage, so that each is timed
                "covariance_s": lambda: self.analyzer.fit_covariance_matrices(**fit, **passes),
                "eigendecomposition_s": lambda: self.analyzer.perform_eigendecomposition(**fit),
                "lambda_s": lambda: self.analyzer.fit_lambda_matrices(**fit, **passes),
            }
            with harmless_warnings_hidden(), transient_bars():
                for stage, run in stages.items():
                    start = time.perf_counter()
                    run()
                    self.timings[stage] = time.perf_counter() - start
            self.analyzer.factors_output_dir(partial_name).rename(final)
        return False

    def _fit_partitioned(self, partial_name: str, final_name: str) -> None:
        """The factor fit split across the processes: each fits its data partition of the covariance and the
        eigen-correction passes under a name of its own; process 0 gathers the partitions, aggregates them, performs
        the eigendecomposition between the two, and publishes the factors as ``final_name``."""
        partitions, rank = self.partitions, self.partitions.rank
        count = partitions.count
        args = FactorArguments(
            strategy=self.strategy, covariance_data_partitions=count, lambda_data_partitions=count
        )  # fmt: skip
        own = f"{partial_name}-{rank}"
        shutil.rmtree(self.analyzer.factors_output_dir(own), ignore_errors=True)  # left by an interrupted fit
        if rank == 0:
            shutil.rmtree(self.analyzer.factors_output_dir(partial_name), ignore_errors=True)
        passes = {"dataset": self.fit_set, "per_device_batch_size": self.train_batch_size, "factor_args": args,
                  "target_data_partitions": [rank], "overwrite_output_dir": True}  # fmt: skip

        def covariance() -> None:
            self.analyzer.fit_covariance_matrices(factors_name=own, **passes)

        def eigendecomposition() -> None:
            if rank == 0:
                self._gather_partitions(partial_name, own)
                self.analyzer.aggregate_covariance_matrices(factors_name=partial_name)
                self.analyzer.perform_eigendecomposition(factors_name=partial_name, factor_args=args)

        def eigen_corrections() -> None:
            self.analyzer.fit_lambda_matrices(factors_name=own, load_from_factors_name=partial_name, **passes)

        def aggregate() -> None:  # its failure, as every step's, reaches every process
            if rank == 0:
                self._gather_partitions(partial_name, own)
                self.analyzer.aggregate_lambda_matrices(factors_name=partial_name)
                if not lambda_matrices_exist(self.analyzer.factors_output_dir(partial_name)):
                    raise PartitionError(
                        "the eigen-corrections of some partitions are missing, so they were not aggregated; is "
                        "factors_dir on a file system every process shares?"
                    )
                for other in range(count):
                    shutil.rmtree(self.analyzer.factors_output_dir(f"{partial_name}-{other}"), ignore_errors=True)
                for path in self.analyzer.factors_output_dir(partial_name).glob(PARTITION_FILES):
                    path.unlink()  # aggregated: the partitions' copies would only take disk space
                self.analyzer.factors_output_dir(partial_name).rename(self.analyzer.factors_output_dir(final_name))

        stages = {"covariance_s": covariance, "eigendecomposition_s": eigendecomposition,
                  "lambda_s": eigen_corrections, "aggregate_s": aggregate}  # fmt: skip
        with harmless_warnings_hidden(), transient_bars():
            for stage, work in stages.items():
                self.process_timings[stage] = partitions.run(stage[:-2], work)
                self.timings[stage] = max(self.process_timings[stage])

    def _gather_partitions(self, partial_name: str, own: str) -> None:
        """Moves every process's partition files into ``partial_name``, with this process's arguments."""
        target = self.analyzer.factors_output_dir(partial_name)
        target.mkdir(parents=True, exist_ok=True)
        for other in range(self.partitions.count):
            folder = self.analyzer.factors_output_dir(f"{partial_name}-{other}")
            for path in folder.glob(PARTITION_FILES):
                os.replace(path, target / path.name)
        for path in self.analyzer.factors_output_dir(own).glob("*_arguments.json"):
            shutil.copy(path, target / path.name)

    @_old_objects_frozen()
    def pairwise_scores(self, queries: Dataset, query_batch_size: Optional[int] = None) -> Optional[Tensor]:
        """Scores ``[len(queries), N]`` of every scored training sample on every query (``N`` of them; with
        partitions: on process 0, the others return ``None``).

        kronfluence makes one pass over the training set per batch of queries, so the default puts all queries in
        one batch: one pass in all.
        """
        partitions = self.partitions
        scores_name = f"tmp_{uuid.uuid4().hex}" if partitions is None else f"tmp_{partitions.share(uuid.uuid4().hex)}"
        names = [scores_name] if partitions is None else [f"{scores_name}-{rank}" for rank in range(partitions.count)]
        compute = {
            "factors_name": self.factors_name,
            "query_dataset": queries,
            "train_dataset": self.score_set,
            "per_device_query_batch_size": query_batch_size or len(queries),
            "per_device_train_batch_size": self.train_batch_size,
            "overwrite_output_dir": True,
        }
        try:
            with harmless_warnings_hidden(), transient_bars():
                if partitions is None:
                    self.analyzer.compute_pairwise_scores(
                        scores_name=scores_name, score_args=ScoreArguments(damping_factor=self.damping), **compute
                    )  # fmt: skip
                    return self.analyzer.load_pairwise_scores(scores_name)["all_modules"].float().cpu()
                args = ScoreArguments(damping_factor=self.damping, data_partitions=partitions.count)
                rank = partitions.rank

                def share() -> None:
                    self.analyzer.compute_pairwise_scores(
                        scores_name=names[rank], score_args=args, target_data_partitions=[rank], **compute
                    )

                self.process_timings["scores_s"] = partitions.run("score", share)
            if rank != 0:
                return None
            shares = [
                load_pairwise_scores(self.analyzer.scores_output_dir(name), partition=(other, 0))["all_modules"]
                for other, name in enumerate(names)
            ]
            return torch.cat(shares, dim=1).float().cpu()
        finally:
            if partitions is None or partitions.rank == 0:  # the others' folders too, once read
                for name in names:
                    shutil.rmtree(self.analyzer.scores_output_dir(name), ignore_errors=True)


@contextmanager
def _this_process_only() -> Iterator[None]:
    """kronfluence keeps one process-wide state, made on first use, with the device and, when ``LOCAL_RANK`` is set
    on a GPU machine, a distributed setup over every process. Each analysis starts it afresh, in this process alone
    (under DDP every process makes its own and they share the passes through ``DataPartitions``), and a later
    analysis may use another device."""
    State._reset_state()
    local_rank = os.environ.pop("LOCAL_RANK", None)
    try:
        yield
    finally:
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank


def check_strategy(strategy: str) -> None:
    """The one check of a strategy name (every influence setting and analysis calls it)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r} is not known to kronfluence; use one of {', '.join(STRATEGIES)}.")


def check_factor_examples(factor_examples: Optional[int]) -> None:
    """The one check of the factor fits' sample size."""
    if factor_examples is not None and factor_examples < 1:
        raise ConfigError(f"factor_examples={factor_examples} must be at least 1, or null for every sample.")


def check_scored(scored: Optional[Tensor], size: int) -> None:
    """The one check of which training samples to score: sorted, distinct indices of a training set of ``size``."""
    if scored is None:
        return
    if scored.dtype != torch.int64 or scored.dim() != 1 or not len(scored):
        raise ConfigError(
            f"scored has dtype {scored.dtype} and shape {tuple(scored.shape)}; expected a non-empty int64 vector of "
            "training indices, or None for every sample."
        )
    if scored[0] < 0 or scored[-1] >= size or not (scored[1:] > scored[:-1]).all():
        raise ConfigError(f"scored must hold sorted, distinct indices in 0..{size - 1} (the training set's).")


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
    partitions: Optional[DataPartitions] = None,
    scored: Optional[Tensor] = None,
) -> InfluenceScores:
    """Fits (or reuses) the factors and scores every training sample (or the ``scored`` ones) on every query in one
    pass.

    With ``partitions``, called on process 0 while the others ``serve``: every pass is split across the processes
    (``InfluenceAnalysis``), and ``timings`` are those of the slowest process, ``process_timings`` each one's.

    Returns:
        Scores ``[len(queries), len(train_set)]``; positive means training on the sample raises the query label's
        margin. With ``scored``, the other samples' columns are NaN: not computed.
    """
    start = time.perf_counter()
    settings = {"strategy": strategy, "train_batch_size": train_batch_size, "num_workers": num_workers,
                "damping": damping, "seed": seed, "factor_examples": factor_examples, "scored": scored}  # fmt: skip
    if partitions is not None and partitions.count > 1 and partitions.rank == 0:
        partitions.share(("scores", {"queries": queries, "query_batch_size": query_batch_size, **settings}))
    made: list[InfluenceAnalysis] = []

    def make() -> None:
        made.append(InfluenceAnalysis(model, train_set, output_dir, device=device, partitions=partitions, **settings))

    if partitions is not None and partitions.count > 1:
        partitions.run("setup", make)  # a process that cannot even start ends the others too
        expected = partitions.share(made[0].factors_name)
        partitions.run("setup", lambda: _same_factors(made[0].factors_name, expected))
    else:
        make()
    analysis = made[0]
    reused = analysis.fit_factors()
    fitted = time.perf_counter()
    scores = analysis.pairwise_scores(queries, query_batch_size)
    if scored is not None and scores is not None:
        scores = torch.full((len(scores), len(train_set)), float("nan")).index_copy_(1, scored, scores)
    done = time.perf_counter()
    return InfluenceScores(
        scores=scores,
        factors_name=analysis.factors_name,
        factors_reused=reused,
        timings={"factors_s": fitted - start, **analysis.timings, "scores_s": done - fitted},
        process_timings=analysis.process_timings,
    )


def _same_factors(name: str, expected: str) -> None:
    """Checks this process fits the same factors as process 0 (same weights, training data and settings)."""
    if name != expected:
        raise PartitionError(
            f"this process's weights, training set or settings differ from process 0's (factors {name} against "
            f"{expected}); every process of the audit needs the same model and the same training set in the same order."
        )


def serve(
    model: nn.Module, train_set: Dataset, output_dir: str | Path, device: torch.device | str, partitions: DataPartitions
) -> Any:
    """What every process but 0 runs while process 0 audits: its share of each ``compute_influence_scores`` that
    process 0 starts with the same ``partitions`` (same weights and training set, its own device), until process 0
    calls ``finish(partitions, value)``; returns that value. A failed share raises once process 0 has finished."""
    failure: Optional[PartitionError] = None
    while True:
        kind, payload = partitions.share()
        if kind == "done":
            if failure is not None:
                raise failure
            return payload
        try:
            compute_influence_scores(model, train_set, output_dir=output_dir, device=device, partitions=partitions,
                                     **payload)  # fmt: skip
        except PartitionError as error:  # process 0 has it too and ends the audit, which ends this loop
            failure = error


def finish(partitions: DataPartitions, value: Any) -> None:
    """Process 0's end of the audit: the processes in ``serve`` return ``value``."""
    partitions.share(("done", value))


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
