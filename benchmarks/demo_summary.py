"""The demo's numbers, from the run `make demo` just wrote: validation and held-out test mean DSC with their
95% bootstrap intervals and the wall-clock time, into benchmarks/results/demo.json, which README quotes.

Eight test patients still make a wide interval, so the run also predicts 24 further patients generated with
another seed (`--unseen`, data/unseen/kaggle_3m), which no choice of the demo's settings has seen. They are
the same 24 whatever the demo's own split, so two demo records compare on them, paired (`--compare`), and on
their test patients where these are the same.

    .venv/bin/python benchmarks/demo_summary.py runs/demo --seconds 290
    .venv/bin/python benchmarks/demo_summary.py --compare earlier_demo.json benchmarks/results/demo.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_speed import cpu_name  # noqa: E402
from stats import bootstrap_ci, paired_difference, verdict  # noqa: E402

from engine import evaluate  # noqa: E402
from synthetic import kaggle_3m_once  # noqa: E402
from utils import read_metrics_csv  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "demo.json"


UNSEEN = REPO / "data" / "unseen"


def subset_summary(values: dict[str, float]) -> dict:
    mean, low, high = bootstrap_ci(list(values.values()))
    return {"dsc_mean": mean, "dsc_mean_ci": [low, high], "cases": values}


def unseen_summary(run_dir: Path) -> dict:
    """The run's mean DSC on 24 patients generated with another seed (made once, then reused)."""
    rows = evaluate(run_dir, data_dir=str(kaggle_3m_once(UNSEEN, 24, seed=1)))["rows"]
    return subset_summary({row["case"]: row["dsc_mean"] for row in rows})


def summary(run_dir: Path, seconds: float) -> dict:
    """The demo record: per subset the mean DSC, its interval and the per-patient values."""
    rows = read_metrics_csv(run_dir / "inference" / "dsc.csv")
    history = json.loads((run_dir / "history.json").read_text())
    record = {"run": run_dir.name, "epochs": len(history), "wall_seconds": seconds, "cpu": cpu_name()}
    for subset in ("validation", "test"):
        record[subset] = subset_summary(
            {row["case"]: row["dsc_mean"] for row in rows if row["subset"] == subset}
        )
    record["date"] = datetime.date.today().isoformat()
    return record


def sentence(record: dict) -> str:
    """README's line about the demo, generated from the record so that the two never disagree."""
    minutes, seconds = divmod(round(record["wall_seconds"]), 60)
    test, validation = record["test"], record["validation"]
    text = (
        f"held-out test mean per-volume DSC {test['dsc_mean']:.3f} (95% CI {test['dsc_mean_ci'][0]:.3f}-"
        f"{test['dsc_mean_ci'][1]:.3f}, {len(test['cases'])} patients), validation "
        f"{validation['dsc_mean']:.3f}, in {minutes} min {seconds} s for training and inference "
        f"({record['epochs']} epochs, {record['cpu']})"
    )
    if "unseen" in record:
        unseen = record["unseen"]
        text += (
            f"; on {len(unseen['cases'])} further patients generated with another seed "
            f"{unseen['dsc_mean']:.3f} (95% CI {unseen['dsc_mean_ci'][0]:.3f}-{unseen['dsc_mean_ci'][1]:.3f})"
        )
    return text


SUBSET_NAMES = {"test": "test patients", "unseen": "further patients"}


def compare_records(earlier: dict, later: dict) -> list[str]:
    """The later demo minus the earlier one, paired, on each subset whose patients both records share."""
    lines = []
    for subset, label in SUBSET_NAMES.items():
        if subset not in earlier or subset not in later:
            continue
        if set(earlier[subset]["cases"]) != set(later[subset]["cases"]):
            lines.append(f"{label}: not the same patients, not compared")
            continue
        difference = paired_difference(later[subset]["cases"], earlier[subset]["cases"])
        names = (f"{later['date']} ({later['run']})", f"{earlier['date']} ({earlier['run']})")
        lines.append(
            f"{label} ({difference.cases}): {later[subset]['dsc_mean']:.3f} against "
            f"{earlier[subset]['dsc_mean']:.3f}, difference {difference.mean_difference:+.3f} "
            f"({difference.low:+.3f} to {difference.high:+.3f}), {verdict(difference, *names)}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--seconds", type=float, help="wall-clock seconds of the demo")
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument("--unseen", action="store_true", help="also predict 24 patients of another seed")
    parser.add_argument(
        "--compare", nargs=2, type=Path, metavar=("EARLIER", "LATER"), help="two demo records, paired"
    )
    args = parser.parse_args(argv)
    if args.compare:
        earlier, later = (json.loads(path.read_text()) for path in args.compare)
        print("\n".join(compare_records(earlier, later)))
        return 0
    if args.run_dir is None or args.seconds is None:
        parser.error("a run folder and --seconds are needed (or --compare EARLIER LATER)")
    record = summary(args.run_dir, args.seconds)
    if args.unseen:
        record["unseen"] = unseen_summary(args.run_dir)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print("Demo: " + sentence(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
