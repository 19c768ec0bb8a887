"""The documents' benchmark tables, written from the results the benchmark scripts saved, so that no table can outlive
the code that produced it.

    python benchmarks/tables.py           # rewrite every generated table in README.md and benchmarks/README.md
    python benchmarks/tables.py --check   # exit 1, naming each table that is not what its results give

A generated table sits between ``<!-- table: <name> -->`` and ``<!-- end table -->`` in a document; ``TABLES`` says
which results files (``benchmarks/results/<pattern>.json``, each ``{"device": ..., "rows": [...]}``) and which
columns make it. A results file whose rows a table needs is committed with the document.
"""

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def count(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:,.0f}"


def seconds(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.0f} s"


def epochs(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}"


def text(value) -> str:
    return "–" if value is None else str(value)


@dataclass
class Table:
    """A table: the results files it reads, its columns (header, row key, format) and which rows it keeps."""

    pattern: str
    columns: list[tuple[str, str, Callable]]
    keep: Callable[[dict], bool] = lambda row: True
    order: Callable[[dict], tuple] = lambda row: ()
    notes: list[str] = field(default_factory=list)

    def rows(self, results: Path) -> list[dict]:
        rows = []
        for path in sorted(results.glob(f"{self.pattern}.json")):
            saved = json.loads(path.read_text())
            rows += [{"device": saved.get("device"), "file": path.stem, **row} for row in saved["rows"]]
        return sorted((row for row in rows if self.keep(row)), key=self.order)

    def render(self, results: Path) -> str:
        rows = self.rows(results)
        if not rows:
            raise SystemExit(f"no rows for table {self.pattern!r} under {results}: run the benchmark that writes them")
        lines = ["| " + " | ".join(header for header, _, _ in self.columns) + " |"]
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(show(row.get(key)) for _, key, show in self.columns) + " |" for row in rows]
        devices = sorted({row["device"] for row in rows if row.get("device")})
        lines += ["", f"Measured on {', '.join(devices)}; results: `benchmarks/results/{self.pattern}.json`."]
        return "\n".join(lines) + "\n"


VICTIM = [
    ("attack", "attack", text),
    ("seed", "seed", text),
    ("images", "num_train", count),
    ("victim acc", "clean_acc", pct),
    ("victim ASR", "asr", pct),
]
RULES = ["the paper's rule", "with contrast", "verified (default)", "second opinion (final)", "true poisons"]
OUTCOME = [  # a forgotten set against the true poisons, and the retrain without it
    ("flagged", "flagged", count),
    ("precision", "precision", pct),
    ("recall", "recall", pct),
    ("retrain acc", "retrain_acc", pct),
    ("retrain ASR", "retrain_asr", pct),
]
DETECTION = [
    *VICTIM,
    ("rule", "rule", text),
    *OUTCOME,
    ("audit", "audit_s", seconds),
    ("audit epochs", "audit_epochs", epochs),
]


COMPARE = [
    *VICTIM[:2],  # attack, seed
    ("detector", "detector", text),
    ("clean images", "clean_used", count),
    *OUTCOME[:3],  # flagged, precision, recall
    ("F1", "f1", pct),
    ("detection", "detect_s", seconds),
    ("retrain acc", "clean_acc", pct),
    ("retrain ASR", "asr", pct),
]


TODAY = ("none", "Δ-Influence (verified", "the Δ-Influence paper", "SCAn", "AGPD", "ASSET", "Cognitive",
         "activation clustering", "oracle")  # fmt: skip


def _compared(row: dict) -> bool:
    """A row of the BadNets or Smooth Trigger comparison (Witches' Brew's, one victim per target, has its own)."""
    return row["attack"] != "witches_brew"


def _victims(row: dict) -> tuple:
    return (row["attack"], row["num_train"], row["seed"])


def _by_victim(row: dict) -> tuple:
    """A comparison's rows by attack and seed, each victim's in the order its benchmark wrote them (a stable sort)."""
    return (row["attack"], row["seed"])


def _by_rule(row: dict) -> tuple:
    """A victim's rows in the order of ``RULES``; a row of another name is refused, naming it."""
    if row["rule"] not in RULES:
        raise SystemExit(f"{row['file']}.json has a row {row['rule']!r}, which no table knows; rerun its benchmark")
    return (*_victims(row), RULES.index(row["rule"]))


TABLES = {
    "detection": Table(
        "detection_*",
        DETECTION,
        keep=lambda row: row["num_train"] <= 10_000,
        order=_by_rule,
    ),
    "compare": Table("compare_*", COMPARE, keep=_compared, order=_by_victim),  # each file's rows as written
    "compare-today": Table(  # the README's: the victim, Δ-Influence, today's detectors, the best 2018 one, the oracle
        "compare_*", COMPARE, keep=lambda row: _compared(row) and row["detector"].startswith(TODAY), order=_by_victim
    ),
    "results": Table(
        "detection_*",
        [*VICTIM, *OUTCOME, ("audit epochs", "audit_epochs", epochs)],
        keep=lambda row: row["rule"] == "second opinion (final)",
        order=_victims,
    ),
}


def generate(document: str, results: Path = RESULTS) -> str:
    """``document`` with every generated table written from ``results``."""

    def table(match: re.Match) -> str:
        name = match.group("name")
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r}; known: {', '.join(TABLES)}")
        return match.group(1) + TABLES[name].render(results) + match.group(4)

    return BLOCK.sub(table, document)


def stale(document: str, results: Path = RESULTS) -> list[str]:
    """The names of the generated tables in ``document`` that differ from what ``results`` give."""
    fresh = {match.group("name"): match.group("body") for match in BLOCK.finditer(generate(document, results))}
    return [
        match.group("name") for match in BLOCK.finditer(document) if match.group("body") != fresh[match.group("name")]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a table is stale")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results folder")
    args = parser.parse_args()
    failed = False
    for path in DOCUMENTS:
        document = path.read_text()
        if args.check:
            for name in stale(document, args.results):
                print(
                    f"{path.relative_to(ROOT)}: table {name!r} is not what its results give; run benchmarks/tables.py"
                )
                failed = True
        else:
            path.write_text(generate(document, args.results))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
