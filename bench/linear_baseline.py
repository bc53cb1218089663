"""A fastText-style anchor for kefu's classifiers, on kefu's own splits.

The published ChnSentiCorp anchors (fastText 92.2%, RBT3 92.8%,
bert-base-chinese 95.0%) were measured on another corpus and split. This runs
the classic strong baseline, a linear model over character 1-3-grams
(TF-IDF + logistic regression), on exactly the files `kefu eval` reads, so
BENCHMARKS.md can say how hard this test split is.

Usage: python bench/linear_baseline.py [--train F] [--test F ...]
Needs scikit-learn. Prints one JSON line per test file.
"""

import argparse
import json
import time


def read(path):
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                texts.append(row["text"])
                labels.append(row["label"])
    return texts, labels


def ngram_model():
    """Character 1-3-gram TF-IDF + logistic regression (needs scikit-learn)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=4.0),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default="data/splits/sentiment-train.jsonl")
    ap.add_argument(
        "--test",
        nargs="+",
        default=["data/splits/sentiment-reviews-test.jsonl", "data/sentiment/test.jsonl"],
    )
    args = ap.parse_args()

    texts, labels = read(args.train)
    started = time.time()
    model = ngram_model()
    model.fit(texts, labels)
    trained = time.time() - started
    for path in args.test:
        t, y = read(path)
        pred = model.predict(t)
        correct = sum(p == g for p, g in zip(pred, y))
        print(
            json.dumps(
                {
                    "model": "char 1-3-gram TF-IDF + logistic regression",
                    "train": args.train,
                    "test": path,
                    "n": len(y),
                    "accuracy": round(correct / len(y), 4),
                    "train_seconds": round(trained, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
