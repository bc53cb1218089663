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

With `--augment N` each line is followed by N altered copies (a span cut
out of it, a few characters dropped, or two neighbours swapped), scored by
the same held-out teacher: the student sees more texts to learn the
teacher's judgement from, and a copy whose crop lost the opinion gets the
teacher's doubt as its target rather than only the original label.

Usage: python scripts/ngram_teacher.py --data TRAIN.jsonl --out OUT.jsonl [--augment N]
Needs scikit-learn.
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from linear_baseline import ngram_model  # noqa: E402


def altered(text, rng):
    """One altered copy of `text`: a cropped span, dropped characters or a swap."""
    chars = list(text)
    if len(chars) > 6:
        op = rng.choice(["crop", "drop", "swap"])
    elif len(chars) > 3:
        op = rng.choice(["drop", "swap"])
    else:
        return text
    if op == "crop":
        k = max(3, int(len(chars) * rng.uniform(0.5, 0.9)))
        start = rng.randrange(0, len(chars) - k + 1)
        chars = chars[start : start + k]
    elif op == "drop":
        kept = [c for c in chars if rng.random() > 0.12]
        chars = kept if len(kept) >= 2 else chars
    else:
        for _ in range(rng.choice([1, 2])):
            i = rng.randrange(0, len(chars) - 1)
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars).strip() or text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="training JSONL (text, label)")
    ap.add_argument("--out", required=True, help="where to write it with probabilities")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--augment", type=int, default=0, metavar="N", help="altered copies to add per line (default 0)"
    )
    args = ap.parse_args()
    if args.augment < 0:
        sys.exit("--augment must be 0 or more")

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
    rng = random.Random(args.seed)
    # A text too short to alter comes back unchanged: no copy then.
    copies = [[c for c in (altered(t, rng) for _ in range(args.augment)) if c != t] for t in texts]
    copy_probs = [np.zeros((len(c), len(classes))) for c in copies]
    # Repeated lines (the training split repeats the chat lines) stay in one
    # fold, so no line is scored by a model that saw its copy.
    folds = StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
    for k, (fit, held) in enumerate(folds.split(texts, labels, groups=texts), 1):
        model = ngram_model()
        model.fit([texts[i] for i in fit], labels[fit])
        cols = [classes.index(c) for c in model.classes_]
        probs[np.ix_(held, cols)] = model.predict_proba([texts[i] for i in held])
        alts = [c for i in held for c in copies[i]]
        if alts:
            scored = iter(model.predict_proba(alts))
            for i in held:
                for row in copy_probs[i]:
                    row[cols] = next(scored)
        agree = (np.array(classes)[probs[held].argmax(1)] == labels[held]).mean()
        print(f"fold {k}/{args.folds}: {len(held)} lines, teacher agrees with the label on {agree:.3f}", file=sys.stderr)
    written = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for row, p, alts, alt_probs in zip(rows, probs, copies, copy_probs):
            out = [(row, p)] + [({**row, "text": a, "augmented": True}, q) for a, q in zip(alts, alt_probs)]
            for r, q in out:
                r["probabilities"] = {c: round(float(x), 4) for c, x in zip(classes, q)}
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                written += 1
    agree = (np.array(classes)[probs.argmax(1)] == labels).mean()
    print(f"wrote {written} lines to {args.out}; teacher agrees with the label on {agree:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
