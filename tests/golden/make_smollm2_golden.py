#!/usr/bin/env python3
"""Golden data from Hugging Face transformers for the real SmolLM2-135M-Instruct model.

Reads the folder written by `scripts/fetch-model.sh smollm2-135m` (AutoTokenizer and
AutoModelForCausalLM, fp32, eager attention, CPU) and writes <out>/transformers/smollm2_135m/:

  tokens.json  {"transformers_version", "tokenizers_version", "tokenizer", "add_special_tokens",
                "cases": [{"text", "ids", "decoded"}, ...]}
               ids = tokenizer(text, add_special_tokens=False).input_ids. Special-token strings
               inside the text (e.g. "<|im_start|>") ARE matched as the special tokens: that is
               what Hugging Face does for added tokens whatever add_special_tokens says (for
               this tokenizer add_special_tokens adds nothing anyway: no BOS).
               decoded = tokenizer.decode(ids, skip_special_tokens=False).
  logits.json  {"transformers_version", "torch_version", "tokenizers_version", "model",
                "value_digits", "prompts": [{"name", "text", "input_ids", "ids", "argmax",
                "top2_margin", "logits"}, ...]}
               The full [T, 49152] logits are too big to commit. Per prompt: "ids" is a sorted
               subset of the vocabulary (the union of every position's top-16 and 128 seeded
               random ids); "logits"[t][j] is the fp32 logit of token ids[j] at position t,
               rounded to `value_digits` significant digits; "argmax"[t] is the argmax over
               the full vocabulary at position t (first index on ties); "top2_margin"[t] is
               its lead over the runner-up (how robust the argmax is).
  greedy.json  {"transformers_version", "torch_version", "model", "prompt", "prompt_ids",
                "max_new_tokens", "eos_token_id", "continuation_ids", "continuation_text",
                "min_top2_margin"}
               model.generate(prompt_ids, do_sample=False, max_new_tokens=32): the greedy
               continuation (prompt excluded; ends early only at eos_token_id, which is then
               included, as generate returns it).

Regenerate (the model folder from scripts/fetch-model.sh; about a minute on 2 cores):
    venv=$(scripts/python-env.sh | tail -1)
    "$venv/bin/python" tests/golden/make_smollm2_golden.py \\
        --model-dir "$(scripts/fetch-model.sh smollm2-135m | tail -1)"
"""
import argparse
import json
import os
import sys

import tokenizers
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TOP_K = 16
RANDOM_IDS = 128
SEED = 2024
VALUE_DIGITS = 8
GREEDY_TOKENS = 32

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi! What's 2+2?"},
    {"role": "assistant", "content": "2 + 2 = 4. 😊"},
    {"role": "user", "content": "Thanks <3"},
]

# Hard strings for the tokenizer. Grouped by what they exercise; keep the order stable, the
# C++ tokenizer tests report failures by index.
TEXTS = [
    # empty and whitespace
    "",
    " ",
    "  ",
    "Hello world",
    " Hello world",
    "Hello  world   with    runs     of spaces",
    "   leading and trailing   ",
    "tabs\tand\t\ttabs\t",
    "line1\nline2\n\nline3\r\nwindows\r\n",
    "\n\n\n",
    " \n \t \n",
    # contractions and case
    "I'm sure they'll say it's fine, don't you think? We've seen it, I'd say.",
    "THEY'RE HERE, 'TIS TRUE, O'Neil's dog'S bone, you'Ll see",
    "MiXeD CaSe camelCaseWords snake_case_words SCREAMING_CASE",
    # digits
    "12345678901234567890",
    "3.14159 and 1,000,000 and -42 and 2024-12-03 and 0x1F",
    "ABC123def456ghi7890",
    "Roman \u216b, fractions \u00bd \u00be, superscripts x\u00b2 y\u00b3, circled \u2460\u2461, "
    "Arabic-Indic \u0661\u0662\u0663, fullwidth \uff11\uff12",
    # accents and other scripts
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade \u00c5ngstr\u00f6m",
    "e\u0301 (combining acute) vs \u00e9 (precomposed)",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0423\u043a\u0440\u0430\u0457\u043d\u0430",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u8fd9\u662f\u4e00\u4e2a\u6d4b\u8bd5\u3002",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u30ab\u30bf\u30ab\u30ca \u30fc",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522 \U0001d7d9\U0001d7da"
    "\U0001d7db math letters and digits",
    # emoji
    "Emoji: \U0001f600\U0001f44d\U0001f3fd\U0001f1eb\U0001f1f7 \u2764\ufe0f",
    "Family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 and flag "
    "\U0001f3f3\ufe0f\u200d\U0001f308 (ZWJ sequences)",
    # special tokens in text
    "<|im_start|>user\nHello<|im_end|>",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|><|im_end|>",
    " <|im_start|> spaced <|im_end|> ",
    "<|im_start |> <|IM_START|> <|im_start <im_start> |im_end|>",
    "<repo_name>meft<file_sep>main.cc<gh_stars>10",
    # odd characters
    "zero\u200bwidth, no-break\u00a0space, soft\u00adhyphen, BOM\ufeff",
    "control \x07 bell \x1b[31m escape \x7f del",
    "\ufffd replacement \U0010fffd private use",
    "\u2581already\u2581marked \u0120G\u0120 \u010a",
    "\u2211 x\u00b2 \u2264 \u221e \u2192 \u03b1\u00b7\u03b2 \u2260 \u03c0",
    "!!!???...---((()))[[[]]]{{{}}}",
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "def foo(x):\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "a" * 40,
    "The quick brown fox jumps over the lazy dog.",
]


def log(msg):
    print(f"make_smollm2_golden: {msg}", file=sys.stderr, flush=True)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    log(f"wrote {path} ({os.path.getsize(path)} bytes)")


def token_cases(tok):
    texts = TEXTS + [tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)]
    cases = []
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        cases.append({"text": text, "ids": ids,
                      "decoded": tok.decode(ids, skip_special_tokens=False)})
    return cases


def rounded(x):
    return float(f"{x:.{VALUE_DIGITS}g}")


def logit_prompt(model, name, text, ids, vocab):
    logits = model(torch.tensor([ids])).logits[0].float()  # [T, V]
    gen = torch.Generator().manual_seed(SEED)
    subset = set(torch.randperm(vocab, generator=gen)[:RANDOM_IDS].tolist())
    subset.update(logits.topk(TOP_K, dim=-1).indices.flatten().tolist())
    subset = sorted(subset)
    top2 = logits.topk(2, dim=-1).values
    return {
        "name": name,
        "text": text,
        "input_ids": ids,
        "ids": subset,
        "argmax": logits.argmax(-1).tolist(),
        "top2_margin": [rounded(m) for m in (top2[:, 0] - top2[:, 1]).tolist()],
        "logits": [[rounded(v) for v in row] for row in logits[:, subset].tolist()],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=os.environ.get("MEFT_SMOLLM2_DIR"),
                        help="folder from scripts/fetch-model.sh smollm2-135m "
                             "(default: $MEFT_SMOLLM2_DIR)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="golden root; files go to <out>/transformers/smollm2_135m/")
    args = parser.parse_args()
    if not args.model_dir or not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        parser.error(f"--model-dir {args.model_dir!r} has no config.json; run "
                     "scripts/fetch-model.sh smollm2-135m and pass the folder it prints")
    torch.set_grad_enabled(False)
    transformers.logging.set_verbosity_error()
    out = os.path.join(args.out, "transformers", "smollm2_135m")
    os.makedirs(out, exist_ok=True)
    versions = {"transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "tokenizers_version": tokenizers.__version__}
    model_name = "SmolLM2-135M-Instruct (scripts/fetch-model.sh smollm2-135m), fp32, eager"

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    write_json(os.path.join(out, "tokens.json"), {
        "transformers_version": versions["transformers_version"],
        "tokenizers_version": versions["tokenizers_version"],
        "tokenizer": "tokenizer.json of scripts/fetch-model.sh smollm2-135m",
        "add_special_tokens": False,
        "cases": token_cases(tok),
    })

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    vocab = model.config.vocab_size
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    chat_ids = tok.apply_chat_template(chat, add_generation_prompt=True)
    plain = "The quick brown fox jumps over the lazy dog because it wanted to"
    digits = "In 1969, 3 astronauts flew 384400 km; 2+2=4 and 10*12=120."
    prompts = [
        logit_prompt(model, "chatml", tok.decode(chat_ids), chat_ids, vocab),
        logit_prompt(model, "plain", plain, tok(plain, add_special_tokens=False).input_ids,
                     vocab),
        logit_prompt(model, "digits", digits, tok(digits, add_special_tokens=False).input_ids,
                     vocab),
    ]
    for p in prompts:
        log(f"logits {p['name']}: {len(p['input_ids'])} positions x {len(p['ids'])} ids; "
            f"smallest top-2 margin {min(p['top2_margin']):.4g}")
    write_json(os.path.join(out, "logits.json"), dict(
        versions, model=model_name, value_digits=VALUE_DIGITS, prompts=prompts))

    story = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ids = tok.apply_chat_template(story, add_generation_prompt=True)
    result = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                           dtype=torch.long),
                            do_sample=False, max_new_tokens=GREEDY_TOKENS,
                            output_logits=True, return_dict_in_generate=True)
    cont = result.sequences[0, len(ids):].tolist()
    margins = [(lambda t: (t[0] - t[1]).item())(step[0].topk(2).values)
               for step in result.logits]
    log(f"greedy: {len(cont)} tokens, smallest top-2 margin {min(margins):.4g}: "
        f"{tok.decode(cont)!r}")
    write_json(os.path.join(out, "greedy.json"), {
        "transformers_version": versions["transformers_version"],
        "torch_version": versions["torch_version"],
        "model": model_name,
        "prompt": tok.decode(ids),
        "prompt_ids": ids,
        "max_new_tokens": GREEDY_TOKENS,
        "eos_token_id": model.generation_config.eos_token_id,
        "continuation_ids": cont,
        "continuation_text": tok.decode(cont),
        "min_top2_margin": rounded(min(margins)),
    })


if __name__ == "__main__":
    main()
