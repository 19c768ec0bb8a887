"""Witches' Brew on the CPU CIFAR-10 setting: for (target, intended class) pairs drawn at random, brew the poisons,
train a victim from scratch on them from a fresh seed, and audit every success with Δ-Influence, then retrain without
what it flagged.

    python benchmarks/witches_brew.py                        # 8 pairs, budget 5 %, eps 16, 1 restart of 100 steps
    python benchmarks/witches_brew.py --eps 32 --known-init 1
    python benchmarks/witches_brew.py --only 0,1,2,6 --compare all    # compare.py's detectors on each success

The victim, the attack and the audit are configs/benchmarks/cifar10_witches_brew_cpu.yaml; each pair overrides the
attack's target and intended class (and the flags below), and is run through train.py as that config. The surrogates
are trained exactly as the victim (the config's `surrogate: victim`), once, and cached (results/attack_cache).

Targets are drawn with --seed among the test images that the (first) surrogate classifies correctly, the paper's
practice; each target's intended class is drawn uniformly among the other classes; none is chosen by hand. Every
pair has its own brew and its own victim, trained from seed 100 + the pair's number (the surrogates: --seed, +1, ...).
Success: the victim classifies the target as the intended class. With --known-init 1, a second victim per pair is
trained from the first surrogate's initial weights and batch order (the "known init" check, which does not depend on
transfer). On each success, the config's audit (through the audit pipeline) gives the default rule, and a second
scoring pass of every sample on the same factors (``..._every_sample``) the paper's rule, beside activation
clustering and spectral signatures (epsilon: the poisons' share of the intended class); the victim is then retrained
from scratch without the default rule's flagged samples, by the config's corrective fit, in as many rounds as the
config's `corrective_rounds` allows (while the retrained model still classifies the target as the intended class, it
is audited again on the samples it kept and the victim retrained without everything flagged so far). The first
retrain's outcome (`first_retrain_*`), the rounds run, the second opinion's give-back (confirmed, or undone when
keeping the samples brought the target's flip back) and the final flagged set (`final_*`) are in the table, which
is printed and written to results/witches_brew.json. With --compare (all, or parts of their titles), each success is
audited instead by compare.py's detectors (the Δ-Influence rows with the config's settings and the target as the
query; the influence baselines on the same factors), each followed by a retrain without its set from --seed:
results/compare_witches_brew.json (its seed column: the victim's seed; rows of pairs run before are kept), whose ASR
column says whether the retrained model still classifies the target as the intended class. The audit table is then
not written.
"""

import json
import tempfile
import time

import compare
import torch
from common import (
    RESULTS,
    audit_callback,
    config_args,
    corrective_fit,
    evaluate,
    every_sample_audit,
    parse_args,
    report,
)

from delta_influence import Correction
from delta_influence.attacks.base import AttackContext, LabeledImages
from delta_influence.audit import AuditData, run_audit
from delta_influence.cli import train
from delta_influence.detectors import ActivationClustering, SpectralSignatures
from delta_influence.devices import device_of
from delta_influence.examples import evaluating
from delta_influence.lightning_modules.unlearning import Retrain
from delta_influence.metrics import detection_metrics

CONFIG = "configs/benchmarks/cifar10_witches_brew_cpu.yaml"
COLUMNS = [
    "pair", "target", "true", "intended", "surrogate_p", "brew_loss", "surrogate_s", "brew_s", "train_s", "clean_acc",
    "victim_p", "success", "known_p", "known_success", "flagged", "precision", "recall", "rule_flagged",
    "rule_precision", "rule_recall", "ref_flagged",
    "ref_precision", "ref_recall", "ac_flagged", "ac_precision", "ac_recall", "ss_flagged", "ss_precision", "ss_recall",
    "first_retrain_success", "rounds", "given_back", "given_back_kept", "final_flagged", "final_precision",
    "final_recall", "retrain_acc", "retrain_success",
]  # fmt: skip
VICTIM_SEED = 100  # victims train from seed 100 + the pair's number, far from the surrogates' seeds
BREW_FLAGS = [  # what makes the poisons: a setting other than its default names the saved victims and audits
    ("--budget", float, 0.05, "poisons per target: a fraction of the training set, or a count"),
    ("--eps", float, 16.0, "L-inf bound in 8-bit levels (of the [0, 1] pixel range: 16 = 16/255)"),
    ("--steps", int, 100, "signed-Adam steps per restart"),
    ("--restarts", int, 1, "restarts per brew (lowest loss kept)"),
    ("--ensemble", int, 1, "surrogates brewed against at once"),
]


def main() -> None:
    args = parse_args(
        __doc__,
        [
            ("--pairs", int, 8, "(target, intended class) pairs"),
            *BREW_FLAGS,
            ("--known-init", int, 0, "1: also train a victim from the first surrogate's init and batch order"),
            ("--only", str, "", "pair numbers, e.g. 0,1: run only those (results/witches_brew_only.json)"),
            ("--victim-seed", int, VICTIM_SEED, "victims train from this + the pair's number (another: held out)"),
            ("--retrain", int, 0, "1: train the victims again even where this script saved them"),
            ("--compare", str, "", "all, or parts of compare.py's detector titles: those instead of the audit"),
        ],
    )
    command = _command(args)
    configured = train.main(command, run=False)  # the config as set: its surrogate recipe and its audit
    clean = train.main([*command, "--data.attack=null"], run=False).datamodule  # what the surrogate trains on
    pairs = draw_pairs(clean, configured.datamodule.attack, args.pairs, args.seed)
    print("pairs (test index, true class -> intended class):", [(t, c, i) for t, c, i, _ in pairs])
    only = {int(number) for number in args.only.split(",")} if args.only else set(range(len(pairs)))
    brew = "".join(f"_{flag[2:]}{getattr(args, flag[2:]):g}" for flag, _, default, _ in BREW_FLAGS
                   if getattr(args, flag[2:]) != default)  # fmt: skip
    held_out = f"_v{args.victim_seed}" if args.victim_seed != VICTIM_SEED else ""
    tag = "witches_brew" + brew + held_out  # names the victims and audits: e.g. witches_brew_eps32_v200
    name = tag + ("_only" if args.only else "")  # the table
    rows, compared, titles = [], [], []
    table = RESULTS / f"compare_{tag}.json"  # with --compare
    for number, (target, true, intended, surrogate_p) in enumerate(pairs):
        if number not in only:
            continue
        pair = ["--data.attack.init_args.target", str(target), "--data.attack.init_args.intended", str(intended)]
        pair += ["--seed_everything", str(args.victim_seed + number)]
        saved = RESULTS / f"{tag}_victim_{number}.pt"
        trained = args.retrain or not saved.exists()
        if not trained:  # the victim this script trained before, for the same pair and seed
            cli = train.main([*command, *pair], run=False)
            cli.datamodule.prepare_data()
            cli.datamodule.setup("fit")
            cli.model.load_state_dict(torch.load(saved))
        else:
            train.main([*command, *pair], run=False).datamodule.prepare_data()  # the brew, made or read from the cache
            start = time.perf_counter()  # so that train_s is the victim's training alone
            cli = train.main(["fit", *command, *pair, "--delta_influence=null"])  # the victim; the audit follows
            torch.save(cli.model.state_dict(), saved)
        data, victim = cli.datamodule, cli.model
        row = {"pair": number, "target": target, "true": true, "intended": intended, "surrogate_p": surrogate_p,
               "brew_loss": data.attack_info["loss"], "surrogate_s": data.attack_info["surrogate_s"],
               "brew_s": data.attack_info["brew_s"],
               "train_s": time.perf_counter() - start if trained else None,
               "clean_acc": evaluate(victim, data)["clean_acc"]}  # fmt: skip
        image, label = data.attack_test_set[0]
        with torch.no_grad(), evaluating(victim):
            probabilities = victim(image[None]).softmax(1)[0]
        row["victim_p"] = float(probabilities[int(label)])
        row["success"] = int(probabilities.argmax()) == int(label)
        if args.known_init:
            poisoned = data.train_set
            known = data.attack.known_init_victim(
                LabeledImages(poisoned.images, poisoned.labels), data.attack_context()
            )
            with torch.no_grad():
                known_p = known(data.attack_test_set.images.float().div(255).to(device_of("auto"))).softmax(1)[0]
            row["known_p"], row["known_success"] = float(known_p[int(label)]), int(known_p.argmax()) == int(label)
        if row["success"] and args.compare:
            compared, titles = compare_pair(cli, audit_callback(configured), row, args, table.stem, compared)
        elif row["success"]:
            row |= audit(cli, audit_callback(configured), number, args.seed, tag)
        rows.append(row)
        if not args.compare:
            report(name, rows, COLUMNS)  # kept up to date after every pair
    if compared:
        if table.exists():  # the pairs run before: kept, these rerun in place
            compared = compare.merge(json.loads(table.read_text())["rows"], compared, titles)
        columns = ["seed", "target", "intended", *compare.COLUMNS]
        report(table.stem, compared, columns)
        (RESULTS / f"{table.stem}.json.partial").unlink()
        title = f"Witches' Brew (train.py {' '.join(command)}, one victim per target)"
        text = compare.markdown(compared, title, columns)
        table.with_suffix(".md").write_text(text)
        print(text)
        compare.log_to_wandb(compared, table.stem.removeprefix("compare_"))
    successes = [row for row in rows if row["success"]]
    print(f"\nsuccess: {len(successes)} of {len(rows)} targets (budget {args.budget}, eps {args.eps:g}/255, "
          f"{args.restarts} restarts x {args.steps} steps, {args.ensemble} surrogate(s))")  # fmt: skip
    if args.known_init:
        print(f"known init: {sum(row['known_success'] for row in rows)} of {len(rows)} targets flipped")
    if successes and not args.compare:
        mean_recall = sum(row["recall"] for row in successes) / len(successes)
        print(f"Δ-Influence (default rule) mean recall on the successes: {mean_recall:.1%}")


def _command(args) -> list[str]:
    """The config with the shared overrides and this script's attack flags."""
    command = config_args(args, CONFIG)
    command += ["--data.attack.init_args.seed", str(args.seed)]
    for flag in ("budget", "eps", "steps", "restarts", "ensemble"):
        command += [f"--data.attack.init_args.{flag}", str(getattr(args, flag))]
    return command


def draw_pairs(clean, attack, count: int, seed: int) -> list[tuple[int, int, int, float]]:
    """``count`` (test index, true class, intended class, surrogate's probability of the intended class): targets
    drawn among the test images the attack's first surrogate classifies correctly, intended classes among the other
    classes."""
    clean.prepare_data()
    clean.setup("fit")
    clean_test = clean.test_set
    device = device_of("auto")
    models, _ = attack.surrogates(LabeledImages(clean.eval_train_set.images, clean.eval_train_set.labels),
                                  AttackContext(clean.num_classes, clean.cache_dir, device))  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for index in torch.randperm(len(clean_test.labels), generator=generator).tolist():
        pixels = clean_test.images[index].float().div(255)[None].to(device)
        with torch.no_grad():
            probabilities = models[0](pixels).softmax(1)[0].cpu()
        true = int(clean_test.labels[index])
        if int(probabilities.argmax()) != true:
            continue
        others = [c for c in range(clean.num_classes) if c != true]
        intended = others[int(torch.randint(len(others), (1,), generator=generator))]
        pairs.append((index, true, intended, float(probabilities[intended])))
        if len(pairs) == count:
            return pairs
    return pairs


def compare_pair(cli, configured, pair: dict, args, name: str, rows: list) -> tuple[list, list]:
    """``rows`` and the pair's victim with compare.py's chosen detectors (the Δ-Influence rows with the config's
    settings and query), each followed by a retrain without its set (ASR after: whether the target stays flipped);
    and every detector's title, in compare.py's order."""
    data = cli.datamodule
    victim_row = {"attack": "witches_brew", "seed": args.victim_seed + pair["pair"], "target": pair["target"],
                  "intended": pair["intended"], "num_train": len(data.eval_train_set)}  # fmt: skip
    rows = [*rows, {**victim_row, "detector": "none (victim)", "flagged": 0, "clean_acc": pair["clean_acc"],
                    "asr": float(pair["success"])}]  # fmt: skip
    every = compare.detectors(data, args.seed, 2000, configured.detector)
    chosen = every if args.compare == "all" else compare.pick(every, args.compare)
    rows = compare.compare(cli, cli.model, chosen, victim_row, name, [args.seed], rows, configured.choice)
    return rows, [title for title, _ in every]


def audit(cli, configured, number: int, seed: int, tag: str) -> dict:
    """The config's Δ-Influence on the target (and every sample scored for the paper's rule), activation clustering
    and spectral signatures beside it, then retraining without the default rule's set (in the config's rounds)."""
    data, victim = cli.datamodule, cli.model
    total, poisons = len(data.eval_train_set), data.poison_indices
    folder = RESULTS / f"{tag}_audit_{number}"
    share = len(poisons) / int((data.eval_train_set.labels == data.attack.intended).sum())  # epsilon in its label
    baselines = {"ac": ActivationClustering(), "ss": SpectralSignatures(expected_fraction=min(share, 0.66))}
    found = {}
    with tempfile.TemporaryDirectory() as factors:
        result = run_audit(victim, AuditData.of(data), configured.detector, folder, factors, configured.choice)
        every = every_sample_audit(victim, data, configured.detector, folder, factors, configured.choice)
        for name, detector in baselines.items():
            metrics = run_audit(victim, AuditData.of(data), detector, result.output_dir / name, factors).metrics
            found |= {f"{name}_{key}": metrics[key] for key in ("flagged", "precision", "recall")}
        fit = corrective_fit(cli, RESULTS / "witches_brew_unlearn", Retrain(seed=seed))
        torch.manual_seed(seed)
        loop = Correction(fit, configured.detector, factors, configured.corrective_rounds, configured.second_opinion)
        correction = loop.run(victim, result)
    default = result.metrics
    reference = detection_metrics(every.evidence.decision.collapsed, total, poisons)
    row = {
        "flagged": int(default["flagged"]), "precision": default["precision"], "recall": default["recall"],
        **{f"rule_{key}": default.get(f"rule_{key}") for key in ("flagged", "precision", "recall")},  # unverified
        "ref_flagged": int(reference["flagged"]), "ref_precision": reference["precision"],
        "ref_recall": reference["recall"],
    } | found  # fmt: skip
    if correction is None:  # nothing flagged
        return row | {"rounds": 0}
    final = detection_metrics(correction.final.forgotten, total, poisons)
    opinion = correction.second_opinion
    return row | {
        "first_retrain_success": correction.rounds[0].corrected.report.asr, "rounds": len(correction.rounds),
        "given_back": len(opinion.opinion.given_back) if opinion and opinion.opinion is not None else 0,
        "given_back_kept": bool(opinion and opinion.confirmed),
        "second_opinion": opinion.reason if opinion else None,
        "final_flagged": int(final["flagged"]), "final_precision": final["precision"], "final_recall": final["recall"],
        "retrain_acc": correction.final.corrected.report.acc, "retrain_success": correction.final.corrected.report.asr,
    }  # fmt: skip


if __name__ == "__main__":
    main()
