#!/usr/bin/env python3
"""Proof that kefu's candle BERT and Hugging Face transformers agree.

  fixtures  Build a tiny random BertForSequenceClassification, save it the way
            `save_pretrained` does (safetensors + slow-tokenizer files, and
            pytorch_model.bin + tokenizer.json), and record transformers' token
            ids and logits for a dozen zh/en inputs in tests/fixtures/. The
            Rust tests assert candle's logits agree within 1e-4.
  check     Load a checkpoint written by `kefu train` in transformers and
            compare its probabilities with `kefu classify` on the same texts.

Needs torch and transformers (`pip install torch transformers`); the outputs of
`fixtures` are committed, so the Rust tests need neither.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

INPUTS = [
    "你好，在吗？",
    "我的快递到哪了，订单号4512876390123",
    "质量太差了，要求退款！！",
    "Where is my parcel? It's been 5 days.",
    "I want a REFUND for this broken iPhone case",
    "这个size偏大吗 我平时穿M",
    "转人工 转人工",
    "Café au lait flavour coffee beans in stock?",
    "满300减50的优惠券怎么领😊",
    "thanks!!! 非常满意，下次还来",
    "  ",  # whitespace only: [CLS] [SEP]
    "发票抬头写错了，能重开吗" * 12,  # longer than max_len: truncated
]
MAX_LEN = 64


def build_vocab():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["where", "is", "my", "parcel", "it", "'", "s", "been", "days", "want",
             "a", "refund", "for", "this", "broken", "case", "in", "stock", "thanks",
             "coffee", "beans", "au", "lait", "cafe", "?", ".", "!", ",", "##s", "##y",
             "##our", "flav", "##e", "##ph", "ip", "##hon", "##one", "i"]
    chars = set()
    for text in INPUTS:
        for ch in text:
            if ord(ch) > 0x2E80:
                chars.add(ch)
    digits = [str(d) for d in range(10)] + ["##" + str(d) for d in range(10)]
    vocab = specials + words + digits + sorted(chars)
    seen, out = set(), []
    for t in vocab:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def fixtures(out_dir):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, BertTokenizerFast

    torch.manual_seed(0)
    vocab = build_vocab()
    os.makedirs(out_dir, exist_ok=True)
    st_dir = os.path.join(out_dir, "tiny-bert")
    pt_dir = os.path.join(out_dir, "tiny-bert-pt")
    for d in (st_dir, pt_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    vocab_file = os.path.join(st_dir, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    labels = ["negative", "neutral", "positive"]
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=MAX_LEN, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, num_labels=3,
        id2label={i: l for i, l in enumerate(labels)}, label2id={l: i for i, l in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    # Random but not tiny weights, so that any layout mistake shows in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()

    slow = BertTokenizer(vocab_file, do_lower_case=True, model_max_length=MAX_LEN)
    model.save_pretrained(st_dir, safe_serialization=True)
    slow.save_pretrained(st_dir)
    for f in ("tokenizer.json",):
        p = os.path.join(st_dir, f)
        if os.path.exists(p):
            os.remove(p)  # this directory exercises the vocab.txt path

    fast = BertTokenizerFast(vocab_file, do_lower_case=True, model_max_length=MAX_LEN)
    model.save_pretrained(pt_dir)
    fast.save_pretrained(pt_dir)
    # transformers 5 writes only safetensors; older releases (and many
    # checkpoints in the wild) ship a pickled state dict instead.
    os.remove(os.path.join(pt_dir, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(pt_dir, "pytorch_model.bin"))
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(pt_dir, f)
        if os.path.exists(p):
            os.remove(p)  # this directory exercises the tokenizer.json path

    # An intent head on the same encoder, so the server can start on fixtures.
    intent_dir = os.path.join(out_dir, "tiny-bert-intent")
    shutil.rmtree(intent_dir, ignore_errors=True)
    intents = ["greeting", "order_status", "return_refund", "product_inquiry", "recommendation",
               "promotion", "payment_invoice", "account", "complaint", "human_agent", "other"]
    intent_model = BertForSequenceClassification(BertConfig(
        **{k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id", "num_labels")},
        num_labels=len(intents), id2label=dict(enumerate(intents)),
        label2id={l: i for i, l in enumerate(intents)}))
    intent_model.bert.load_state_dict(model.bert.state_dict())
    intent_model.save_pretrained(intent_dir)
    slow.save_pretrained(intent_dir)

    enc = slow(INPUTS, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    fast_enc = fast(INPUTS, padding=True, truncation=True, max_length=MAX_LEN)
    assert enc["input_ids"].tolist() == fast_enc["input_ids"], "slow and fast tokenizers disagree"
    with torch.no_grad():
        logits = model(**enc).logits
    ids = [[int(t) for t, m in zip(row, mask) if m] for row, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())]
    expected = {
        "max_len": MAX_LEN,
        "labels": labels,
        "inputs": INPUTS,
        "input_ids": ids,
        "logits": logits.tolist(),
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    with open(os.path.join(out_dir, "tiny-bert-expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
    print(f"wrote {st_dir}, {pt_dir} and tiny-bert-expected.json ({len(INPUTS)} inputs)")


def check(model_dir, kefu, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # A `--half` checkpoint loads in f16, and transformers would then compute
    # in f16 on the CPU; kefu widens the weights to f32 first, so compare that.
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).float().eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits, -1)
    id2label = model.config.id2label
    out = subprocess.run([kefu, "classify", "--model", model_dir, *texts],
                         check=True, capture_output=True, text=True).stdout.splitlines()
    worst = 0.0
    for text, row, line in zip(texts, probs.tolist(), out):
        ours = {p["label"]: p["probability"] for p in json.loads(line)["probabilities"]}
        theirs = {id2label[i]: p for i, p in enumerate(row)}
        diff = max(abs(ours[k] - theirs[k]) for k in theirs)
        worst = max(worst, diff)
        print(f"{max(theirs, key=theirs.get):>16} {diff:.2e}  {text}")
    print(f"transformers loaded {model_dir}; largest probability difference vs kefu: {worst:.2e}")
    if worst > 1e-3:
        sys.exit("kefu and transformers disagree")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixtures", help="write the tiny-BERT fixtures")
    f.add_argument("--out", default="tests/fixtures")
    c = sub.add_parser("check", help="load a kefu checkpoint in transformers and compare with kefu")
    c.add_argument("--model", required=True)
    c.add_argument("--kefu", default="target/debug/kefu")
    c.add_argument("texts", nargs="*", default=INPUTS[:10])
    args = ap.parse_args()
    if args.cmd == "fixtures":
        fixtures(args.out)
    else:
        check(args.model, args.kefu, args.texts)


if __name__ == "__main__":
    main()
