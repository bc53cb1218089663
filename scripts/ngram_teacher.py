#!/usr/bin/env python3
"""Soft labels for `kefu train` from a character n-gram teacher.

A linear model over character 1-3-grams (TF-IDF + logistic regression, the
same as bench/linear_baseline.py) scores 4 points above kefu's small BERT on
the review test split: it memorises which short character sequences carry
sentiment, which a small encoder trained from scratch on ~25k texts learns
slowly. This writes the training file again with each line's
`probabilities` from that model, for `kefu train --soft-weight` to blend
into the target. Every line is scored by a model that did not see it
(k-fold cross-fitting), so the teacher's probabilities are as unsure on a
line as they would be on a new text rather than a memorised 1.0.

Usage: python scripts/ngram_teacher.py --data TRAIN.jsonl --out OUT.jsonl
Needs scikit-learn.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from linear_baseline import ngram_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="training JSONL (text, label)")
    ap.add_argument("--out", required=True, help="where to write it with probabilities")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    try:
        import numpy as np
        from sklearn.model_selection import StratifiedGroupKFold
    except ImportError:
        sys.exit("the n-gram teacher needs scikit-learn: pip install scikit-learn")

    rows = []
    with open(args.data, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if "text" not in row or "label" not in row:
                    sys.exit(f"{args.data}:{n}: expected text and label")
                rows.append(row)
    texts = [r["text"] for r in rows]
    labels = np.array([r["label"] for r in rows])
    classes = sorted(set(labels))
    probs = np.zeros((len(rows), len(classes)))
    # Repeated lines (the training split repeats the chat lines) stay in one
    # fold, so no line is scored by a model that saw its copy.
    folds = StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
    for k, (fit, held) in enumerate(folds.split(texts, labels, groups=texts), 1):
        model = ngram_model()
        model.fit([texts[i] for i in fit], labels[fit])
        cols = [classes.index(c) for c in model.classes_]
        probs[np.ix_(held, cols)] = model.predict_proba([texts[i] for i in held])
        agree = (np.array(classes)[probs[held].argmax(1)] == labels[held]).mean()
        print(f"fold {k}/{args.folds}: {len(held)} lines, teacher agrees with the label on {agree:.3f}", file=sys.stderr)
    with open(args.out, "w", encoding="utf-8") as f:
        for row, p in zip(rows, probs):
            row["probabilities"] = {c: round(float(x), 4) for c, x in zip(classes, p)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    agree = (np.array(classes)[probs.argmax(1)] == labels).mean()
    print(f"wrote {len(rows)} lines to {args.out}; teacher agrees with the label on {agree:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
