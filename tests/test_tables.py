"""benchmarks/tables.py: the documents' benchmark tables are written from the saved results, and a table that
differs from its results is caught; the README's settings table states the code's defaults."""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import tables  # noqa: E402  (the benchmarks' folder, added above)

ROWS = [  # a victim's rows as detection.py writes them (only the columns the tables read)
    {"attack": "badnets", "seed": 0, "num_train": 10000, "clean_acc": 0.6657, "asr": 0.941, "rule": rule,
     "flagged": flagged, "precision": precision, "recall": recall, "retrain_acc": acc, "retrain_asr": asr,
     "audit_s": 90.1, "audit_epochs": 7.06}
    for rule, flagged, precision, recall, acc, asr in [
        ("verified (default)", 255, 0.9608, 0.98, 0.665, 0.005),
        ("the paper's rule", 1382, 0.1693, 0.936, None, None),
        ("with contrast", 279, 0.8387, 0.936, None, None),
    ]
]  # fmt: skip
EXPECTED = """\
| attack | seed | images | victim acc | victim ASR | rule | flagged | precision | recall | retrain acc | retrain ASR \
| audit | audit epochs |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| badnets | 0 | 10,000 | 66.6 % | 94.1 % | the paper's rule | 1,382 | 16.9 % | 93.6 % | – | – | 90 s | 7.1 |
| badnets | 0 | 10,000 | 66.6 % | 94.1 % | with contrast | 279 | 83.9 % | 93.6 % | – | – | 90 s | 7.1 |
| badnets | 0 | 10,000 | 66.6 % | 94.1 % | verified (default) | 255 | 96.1 % | 98.0 % | 66.5 % | 0.5 % | 90 s | 7.1 |

Measured on cpu (2 threads); results: `benchmarks/results/detection_*.json`.
"""


def test_a_table_is_written_from_its_results_and_a_changed_cell_is_caught(tmp_path):
    (tmp_path / "detection_badnets.json").write_text(json.dumps({"device": "cpu (2 threads)", "rows": ROWS}))
    assert tables.TABLES["detection"].render(tmp_path) == EXPECTED
    document = "# Results\n\n<!-- table: detection -->\nold\n<!-- end table -->\n\nText after.\n"
    written = tables.generate(document, tmp_path)
    assert written == f"# Results\n\n<!-- table: detection -->\n{EXPECTED}<!-- end table -->\n\nText after.\n"
    assert tables.stale(document, tmp_path) == ["detection"] and tables.stale(written, tmp_path) == []
    assert tables.stale(written.replace("96.1 %", "96.2 %"), tmp_path) == ["detection"]


def test_the_documents_tables_are_what_the_committed_results_give():
    for document in tables.DOCUMENTS:
        assert tables.stale(document.read_text()) == [], f"{document}: run python benchmarks/tables.py"


def test_the_readmes_detector_settings_are_the_detectors_defaults():
    """The README's settings table states each default of DeltaInfluence as the code has it."""
    from delta_influence import DeltaInfluence

    words = {"`null`": None, "`true`": True, "`false`": False}
    defaults, stated = DeltaInfluence(), {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names, values = re.findall(r"`(\w+)`", cells[0]), [value.strip() for value in cells[1].split(",")]
        scalar = (int, float, str, type(None))  # the verification's row describes its settings' object in words
        if len(names) == len(values) and all(isinstance(getattr(defaults, n, ()), scalar) for n in names):
            for name, value in zip(names, values):
                stated[name] = words[value] if value in words else value.strip("`")
    assert len(stated) == 15  # every setting of the table but the verification
    for name, value in stated.items():
        default = getattr(defaults, name)
        assert default is None if value is None else str(default) == str(value), (name, default, value)


def test_rows_run_again_take_their_places_and_new_ones_their_detectors_place():
    """compare.py --only (and witches_brew.py --compare on more pairs) merge into the table they extend."""
    import compare  # the benchmarks' folder; imports the project's detectors

    titles = ["Δ-Influence", "SCAn", "oracle"]
    earlier = [{"seed": seed, "detector": detector, "f1": 0.5} for seed in (100, 101)
               for detector in ("none (victim)", "Δ-Influence", "oracle")]  # fmt: skip
    rerun = [{"seed": 101, "detector": "SCAn", "f1": 0.9}, {"seed": 100, "detector": "oracle", "f1": 1.0}]
    merged = compare.merge(earlier, rerun, titles)
    assert [(row["seed"], row["detector"], row["f1"]) for row in merged] == [
        (100, "none (victim)", 0.5), (100, "Δ-Influence", 0.5), (100, "oracle", 1.0),
        (101, "none (victim)", 0.5), (101, "Δ-Influence", 0.5), (101, "SCAn", 0.9), (101, "oracle", 0.5),
    ]  # fmt: skip
