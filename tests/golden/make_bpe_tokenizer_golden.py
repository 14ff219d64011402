#!/usr/bin/env python3
"""A tiny SentencePiece BPE tokenizer with byte fallback, converted by transformers, and its
token ids: a fixture for tokenizer.json files laid out like Llama-2's and Mistral's.

Trains a SentencePiece BPE model (vocabulary 512 including the 256 byte pieces, byte_fallback,
split_digits, identity normalization: Llama-2's trainer settings) on the fixed corpus below,
deterministically (one thread, every sentence, no shuffling), converts it with
LlamaTokenizerFast(vocab_file=..., from_slow=True) and writes two variants to
<out>/transformers/<variant>/:

  llama_bpe_tiny            legacy=True, what Llama-2 / Mistral ship: normalizer
                            Sequence[Prepend("\u2581"), Replace(" ", "\u2581")], no pre-tokenizer
  llama_bpe_tiny_metaspace  legacy=False, the newer layout: no normalizer, pre_tokenizer
                            Metaspace(replacement "\u2581", prepend_scheme "first", split false)

Both: model BPE with byte_fallback and fuse_unk, unk "<unk>" (0), bos "<s>" (1), eos "</s>" (2);
decoder Sequence[Replace, ByteFallback, Fuse, Strip]. Each folder holds tokenizer.json,
tokenizer_config.json, the SentencePiece tokenizer.model they come from, and tokens.json in the
format of make_smollm2_golden.py:
  {"transformers_version", "tokenizers_version", "sentencepiece_version", "tokenizer",
   "add_special_tokens": false, "cases": [{"text", "ids", "decoded"}, ...]}
with ids = tokenizer(text, add_special_tokens=False).input_ids (so no BOS; "<s>" and "</s>"
written in the text are matched as special tokens) and
decoded = tokenizer.decode(ids, skip_special_tokens=False).

Regenerate:
    "$(scripts/python-env.sh | tail -1)/bin/python" tests/golden/make_bpe_tokenizer_golden.py
"""
import argparse
import io
import json
import os
import shutil
import sys
import tempfile

import sentencepiece
import tokenizers
import transformers
from transformers import LlamaTokenizerFast

VOCAB_SIZE = 512

CORPUS = """\
The quick brown fox jumps over the lazy dog.
A parameter server owns the sparse adapter and answers lookups from the worker.
The worker runs the frozen model on the GPU and sends gradients back to the server.
Each layer selects a few rows of keys and values for every token in the batch.
In 2024 the team trained 3 models with 7 billion parameters on 1 GPU.
She said: "It's not the size of the model, it's the size of the memory."
We've tested it, they'll test it again, and you'd better test it too.
Numbers like 12, 345 and 6789 are split into single digits by the tokenizer.
Tabs\tand  double  spaces   are kept as they are.
def forward(x):
    return x * 2 + 1
Questions? Answers! Lists: one, two, three; more: four, five.
The router scores experts, keeps the best ones, and scores only their keys.
Adam updates only the rows that were touched during the step.
Memory on the host is large; memory on the GPU is small and precious.
"""

TEXTS = [
    "",
    " ",
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "Hello  world   with    runs",
    "line one\nline two\n\nline four\n",
    "\n",
    "tabs\tand\ttabs",
    "The quick brown fox jumps over the lazy dog.",
    "the worker and the server",
    "Numbers 12345 and 3.14",
    "It's they'll we've you'd",
    "UPPER lower MiXeD",
    "caf\u00e9 na\u00efve",  # not in the corpus: byte fallback
    "\u4f60\u597d\u4e16\u754c",
    "emoji \U0001f600 and \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u2581already\u2581marked",
    "<s>",
    "<s>Hello</s>",
    "text <s> middle </s> end",
    "<unk>",
    "<s >not special</ s>",
    "q\u00fcestion: z\u00fcrich? \u00df",
    "zero\u200bwidth",
    "x" * 30,
]


def log(msg):
    print(f"make_bpe_tokenizer_golden: {msg}", file=sys.stderr, flush=True)


def train(path):
    """Writes the trained model to `path`. Through model_writer rather than model_prefix, so the
    model's recorded trainer settings hold no temporary path and the file is reproducible."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def write_variant(out_root, name, spm_model, legacy):
    out = os.path.join(out_root, "transformers", name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    # add_prefix_space=True is SentencePiece's add_dummy_prefix; left unset, this constructor
    # passes None to the converter, which then drops the prefix.
    tok = LlamaTokenizerFast(vocab_file=spm_model, from_slow=True, legacy=legacy,
                             add_prefix_space=True, add_bos_token=True, add_eos_token=False)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tmp, f), out)
    shutil.copy(spm_model, os.path.join(out, "tokenizer.model"))
    # Read back what was written, so the ids are those of the committed files.
    tok = LlamaTokenizerFast.from_pretrained(out)
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    cases, differ = [], []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        cases.append({"text": text, "ids": ids,
                      "decoded": tok.decode(ids, skip_special_tokens=False)})
        if not any(s in text for s in ("<s>", "</s>", "<unk>")) and ids != sp.encode(text):
            differ.append(text)
    # Cross-check: without special tokens in the text, SentencePiece itself must agree.
    log(f"{name}: texts without special tokens whose ids differ from SentencePiece's: "
        f"{differ or 'none'}")
    golden = {
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "sentencepiece_version": sentencepiece.__version__,
        "tokenizer": f"tests/golden/transformers/{name}/tokenizer.json "
                     f"(LlamaTokenizerFast from_slow, legacy={legacy})",
        "add_special_tokens": False,
        "cases": cases,
    }
    with open(os.path.join(out, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    pre = json.load(open(os.path.join(out, "tokenizer.json"), encoding="utf-8"))["pre_tokenizer"]
    log(f"wrote {out} (pre_tokenizer {pre}; "
        f"{sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))} bytes)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="golden root; files go to <out>/transformers/<variant>/")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        spm_model = train(os.path.join(tmp, "tokenizer.model"))
        write_variant(args.out, "llama_bpe_tiny", spm_model, legacy=True)
        write_variant(args.out, "llama_bpe_tiny_metaspace", spm_model, legacy=False)


if __name__ == "__main__":
    main()
