"""Survey trees: accuracy next to the majority-class baseline (issue 2's "must show").

Usage: .venv/bin/python benchmarks/tree_accuracy.py [--shared ../shared/data]
Prints a Markdown table: data set, tree, train (members) accuracy, held-out
(non-member) accuracy, and the majority-class baseline on the held-out rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mlinvert.data import load
from mlinvert.data.surveys import SurveyDataset
from mlinvert.targets.tree import TreeConfig, train_tree


def main() -> None:
    """Train the default and a depth-6 tree per survey and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.shared)
    specs = [f"steak:{root / 'steak-survey/steak-risk-survey.csv'}", f"gss:{root / 'gss'}", "fair"]
    print("| data | tree | train acc | held-out acc | majority baseline (held-out) |")
    print("|---|---|---|---|---|")
    for spec in specs:
        data = load(spec, seed=args.seed)
        assert isinstance(data, SurveyDataset)
        X_tr, y_tr = data.members()
        X_te, y_te = data.nonmembers()
        majority = int(np.bincount(y_tr).argmax())
        baseline = float(np.mean(y_te == majority))
        for name, config in (("default (unpruned)", None), ("depth 6", TreeConfig(max_depth=6))):
            model, _ = train_tree(data, seed=args.seed, config=config)
            train_acc = float(np.mean(model.predict(X_tr) == y_tr))
            test_acc = float(np.mean(model.predict(X_te) == y_te))
            print(
                f"| {spec.split(':')[0]} | {name} | {train_acc:.3f} | {test_acc:.3f} "
                f"| {baseline:.3f} ({data.class_names[majority]}) |"
            )


if __name__ == "__main__":
    main()
