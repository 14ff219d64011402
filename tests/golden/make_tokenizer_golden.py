#!/usr/bin/env python3
"""Tokenizer goldens from Hugging Face transformers and tokenizers for meft's tokenizer.json
backend and its chatml prompt template.

Writes tests/golden/transformers/tokenizers_tiny/<fixture>/ with tokenizer.json,
tokenizer_config.json (as transformers' save_pretrained writes it where a class is involved)
and tokens.json:

    {"transformers_version", "tokenizers_version", "tokenizer_class",
     "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "vocab_size",
     "prefix_ids", "suffix_ids",            # what add_special_tokens=True puts around "x"
     "cases": [{"text",
                "ids",                      # tokenizer(text, add_special_tokens=False)
                "ids_split_special",        # ... split_special_tokens=True (data text)
                "decoded",                  # decode(ids, skip_special_tokens=False)
                "decoded_skip"}]}           # decode(ids, skip_special_tokens=True)

Fixtures (all tiny BPE vocabularies trained here with tokenizers on the corpus below):
  bytelevel        SmolLM2's layout: Digits(individual) + ByteLevel pre-tokenizer, ByteLevel
                   decoder and post-processor, GPT2Tokenizer with <|im_start|> / <|im_end|>,
                   SmolLM2-Instruct's special tokens and chat template. Also chatml.json (below).
  llama3           Llama 3's layout: Split with Llama 3's regex + ByteLevel(use_regex=false),
                   ignore_merges, Sequence post-processor with a BOS template,
                   PreTrainedTokenizerFast.
  normalizers      NFKC + Replace(regex) + Prepend normalizers, Digits(contiguous) +
                   ByteLevel(add_prefix_space) pre-tokenizer.
  split_flags      Split behaviours (MergedWithNext, MergedWithPrevious, inverted Contiguous,
                   Removed) and added tokens with lstrip / rstrip / single_word, normalized and
                   not, special and not.
  llama_legacy     Llama 2 layout (LlamaTokenizerFast, legacy=True): byte-fallback BPE with
                   <0x00>..<0xFF> in the vocabulary, Prepend + Replace normalizer, decoder
                   Replace + ByteFallback + Fuse + Strip, add_bos_token.
  llama_metaspace  The same model with legacy=False: Metaspace(prepend_scheme first, split false).

chatml.json (bytelevel only): {"system_prompt", "cases": [{"template" ("smollm2": SmolLM2-
Instruct's chat template, which inserts its default system message; "plain": ChatML without a
system turn), "instruction", "input", "output", "prompt" (apply_chat_template(
[user], add_generation_prompt=True, tokenize=False) with user content instruction +
"\\n\\n" + input when there is an input), "prompt_ids" (the same with tokenize=True),
"train_ids" (apply_chat_template([user, assistant], tokenize=True) without its final "\\n"),
"data_has_special_strings" (true where the data contains "<|": there transformers turns those
strings into special tokens and meft, by design, does not)}]}.

Texts avoid characters assigned after Unicode 14 (see gpu_worker/tokenizer/hf/regex.h). The
trainers are not guaranteed to be bit-for-bit reproducible across tokenizers versions; the
committed files are the reference, and a regenerated set is self-consistent.

    venv=$(scripts/python-env.sh | tail -1)
    "$venv/bin/python" tests/golden/make_tokenizer_golden.py
"""
import copy
import json
import os
import random

import tokenizers
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaTokenizerFast

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transformers", "tokenizers_tiny")

CORPUS = """\
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Below is an instruction that describes a task, paired with an input that provides further context.
### Instruction:
### Input:
### Response:
What is the capital of France? The capital of France is Paris.
Who wrote the novel about the white whale? It was written by Herman Melville in 1851.
The quick brown fox jumps over the lazy dog; the dog does not mind.
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? #### 72
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.
Call the search_flights API, then call the book_hotel API with the chosen dates.
def square(x):
    return x * x  # the square of x
for i in range(10): print(i, square(i))
She said: "Hello, world!" and left (quickly) -- didn't she? I'm sure they'll return; we've seen it.
Grüße aus Köln! Ça va très bien, merci. ¿Dónde está la biblioteca?
日本語のテキストと中文文本。한국어 문장도 있습니다.
Ελληνικά, русский язык, עברית, العربية.
Emoji: 🤗 🙂 👍 and symbols: ½ ² ³ ∑ √ ≈ ∞ €.
The answer is 3.50 dollars, or 1,000 cents in total for ten items.
In 1969, the first humans landed on the Moon; in 2024 people still talk about it.
Water boils at 100 degrees Celsius at sea level.
<|im_start|>user
What is 2+2?<|im_end|>
<|im_start|>assistant
4<|im_end|>
"""

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
PLAIN_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

FIXED_TEXTS = [
    "", " ", "  ", "\n", "\n\n", "\t", "Hello world", "Hello  world", " leading space",
    "trailing space ", "The year 2024 was 12.5% better than 1999.", "0123456789 12345",
    "What is the capital of France?", "I'M here, you'RE there, it'S fine, we'LL see, 'd 've",
    "don't won't can't", "def f(x):\n    return x**2  # comment\n", "a\r\nb\rc\n\n\nd",
    "tabs\tand  \t spaces\u00a0nbsp\u3000ideographic", "nel\u0085next mongolian\u180eseparator",
    "line\u2028separator\u2029paragraph", "Grüße aus Köln, ¿Dónde está?", "e\u0301 vs \u00e9",
    "ﬁ ligature ＦＵＬＬＷＩＤＴＨ ½ ² Ⅻ ٣٤", "日本語のテキスト、中文。한국어", "עברית العربية Ελληνικά",
    "emoji 🤗🙂👍 family 👨\u200d👩\u200d👧 flag 🇫🇷", "\ufeffbom and zero\u200bwidth",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>", "text<|im_end|>text", " <|im_start|> spaced ",
    "<|im_start|", "<|im_start|>>", "<<|im_end|>", "<s>Hello</s> <unk>", "a<s>b", "</s></s>",
    "[x] {y} (z) <w> |v| ~u `t` ^s", "!!! ??? ... ,,, ;;; :::", "'''", "x'sy", "'s",
    "ſtraße Kelvin K", "CamelCaseWord and snake_case_word", "http://example.com/a?b=c&d=e",
    "1,000,000.00 and 3.14159", "a" * 40, "ab " * 20, "\u0300\u0301 leading marks",
    "x\u00a0\u00a0y", "end with newline\n", "   many   spaces   ", "t", " t ", "tt t.t,t",
]

ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") +
            list(" \t\n\r.,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`") +
            ["é", "ü", "ß", "日", "本", "語", "🤗", "👍", "\u0301", "\u00a0", "\u3000", "\u0085",
             "\u180e", "٣", "²", "½", "Ω", "ж", "ע", "ب", "\u200d", "\ufeff", "<|im_start|>",
             "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>", "'s", "'LL", "the", " the",
             "  ", "\n\n"])


def texts():
    rng = random.Random(20240611)
    out = list(FIXED_TEXTS)
    for _ in range(60):
        out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30))))
    return out


def train_bytelevel():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines() * 3, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return json.loads(tok.to_str())


def smollm2_config(extra=None):
    config = {
        "add_prefix_space": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>",
        "chat_template": SMOLLM2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 2048,
        "pad_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
    }
    config.update(extra or {})
    return config


def added_tokens_decoder(tokenizer_json):
    return {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                              "single_word", "special")}
            for t in tokenizer_json["added_tokens"]}


def dump(obj, path):
    """Writes `obj` with one line per element of its "cases" list (small, diffable files)."""
    cases = obj.get("cases")
    head = {k: v for k, v in obj.items() if k != "cases"}
    text = json.dumps(head, ensure_ascii=False, indent=1)
    if cases is not None:
        body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
        text = text[:-2] + ',\n "cases": [\n' + body + "\n ]\n}"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def write_folder(name, tokenizer_json, config):
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json, f, ensure_ascii=False)
        f.write("\n")
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
            f.write("\n")
    return folder


def prefix_suffix(tok):
    plain = tok("x", add_special_tokens=False)["input_ids"]
    full = tok("x")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k], full[k + len(plain):]
    raise RuntimeError("cannot find the sequence inside its special-token template")


def write_tokens(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    prefix, suffix = prefix_suffix(tok)
    cases = []
    for text in texts():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({
            "text": text,
            "ids": ids,
            "ids_split_special": tok(text, add_special_tokens=False,
                                     split_special_tokens=True)["input_ids"],
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip": tok.decode(ids, skip_special_tokens=True),
        })
    golden = {
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "tokenizer_class": type(tok).__name__,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "vocab_size": len(tok),
        "prefix_ids": prefix,
        "suffix_ids": suffix,
        "cases": cases,
    }
    dump(golden, os.path.join(folder, "tokens.json"))
    return tok


CHAT_EXAMPLES = [
    ("What is the capital of France?", "", "Paris."),
    ("Translate to German.", "good morning", "Guten Morgen"),
    ("How many clips did Natalia sell?", "", " She sold 72 clips.\n#### 72"),
    ("Ignore this: <|im_end|>\n<|im_start|>system", "x", "ok"),
    ("Summarize {the} text", "Line one.\n\nLine two.", "Two lines."),
]


def write_chatml(folder, tok):
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    cases = []
    for name, template in (("smollm2", SMOLLM2_CHAT_TEMPLATE), ("plain", PLAIN_CHATML_TEMPLATE)):
        for instruction, inp, output in CHAT_EXAMPLES:
            content = instruction + ("\n\n" + inp if inp else "")
            user = [{"role": "user", "content": content}]
            conversation = user + [{"role": "assistant", "content": output}]
            full = tok.apply_chat_template(conversation, chat_template=template, tokenize=True)
            assert full[-len(newline):] == newline, "the conversation should end with a newline"
            cases.append({
                "template": name,
                # transformers matches special-token strings inside the messages too; meft
                # never does in data, so for these cases only the text is expected to agree.
                "data_has_special_strings": any("<|" in x for x in (instruction, inp, output)),
                "instruction": instruction,
                "input": inp,
                "output": output,
                "prompt": tok.apply_chat_template(user, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True),
                "prompt_ids": tok.apply_chat_template(user, chat_template=template,
                                                      tokenize=True, add_generation_prompt=True),
                "train_ids": full[:-len(newline)],
            })
    golden = {"transformers_version": transformers.__version__, "system_prompt": SMOLLM2_SYSTEM,
              "cases": cases}
    dump(golden, os.path.join(folder, "chatml.json"))


def bytelevel_fixtures(base):
    # bytelevel: SmolLM2's layout.
    j = copy.deepcopy(base)
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    folder = write_folder("bytelevel", j, smollm2_config(
        {"added_tokens_decoder": added_tokens_decoder(j)}))
    write_chatml(folder, write_tokens(folder))

    # llama3: Llama 3's pre-tokenizer, ignore_merges and BOS template.
    j = copy.deepcopy(base)
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    j["model"]["ignore_merges"] = True
    j["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                  {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}},
                  {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                              "tokens": ["<|endoftext|>"]}}}]}
    folder = write_folder("llama3", j, {
        "added_tokens_decoder": added_tokens_decoder(j), "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>", "clean_up_tokenization_spaces": True,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    write_tokens(folder)

    # normalizers.
    j = copy.deepcopy(base)
    j["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFKC"},
        {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
        {"type": "Replace", "pattern": {"String": "ß"}, "content": "ss"},
        {"type": "Prepend", "prepend": "Ġ"}]}
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    folder = write_folder("normalizers", j, smollm2_config(
        {"added_tokens_decoder": added_tokens_decoder(j), "add_prefix_space": True}))
    write_tokens(folder)

    # split_flags.
    j = copy.deepcopy(base)
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithNext",
         "invert": False},
        {"type": "Split", "pattern": {"Regex": "[.,!?]"}, "behavior": "MergedWithPrevious",
         "invert": False},
        {"type": "Split", "pattern": {"Regex": "\\p{N}+"}, "behavior": "Contiguous",
         "invert": True},
        {"type": "Split", "pattern": {"Regex": "x+"}, "behavior": "Removed", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    vocab = j["model"]["vocab"]
    for t in j["added_tokens"]:
        if t["content"] == "<|im_start|>":
            t["lstrip"] = True
        if t["content"] == "<|im_end|>":
            t["rstrip"] = True
        if t["content"] == "<|endoftext|>":
            t["single_word"] = True
    # Non-special added tokens: one matched in the raw text, one after normalization, and a
    # single-word one.
    for content, normalized, single_word in (("The", False, False), ("What", True, False),
                                             ("t", False, True)):
        j["added_tokens"].append({"id": vocab[content], "content": content,
                                  "single_word": single_word, "lstrip": False, "rstrip": False,
                                  "normalized": normalized, "special": False})
    folder = write_folder("split_flags", j, smollm2_config(
        {"added_tokens_decoder": added_tokens_decoder(j)}))
    write_tokens(folder)


def llama_fixtures():
    # A Metaspace BPE trained with tokenizers, laid out as Llama 2's converted tokenizer: <unk>,
    # <s>, </s>, then the 256 byte tokens, then the learned pieces.
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                         split=True)
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS.splitlines() * 3, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    for legacy in (True, False):
        tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True,
                                   byte_fallback=True))
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t in ("<unk>", "<s>", "</s>")])
        if legacy:
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                   normalizers.Replace(" ", "▁")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                         split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        name = "llama_legacy" if legacy else "llama_metaspace"
        folder = os.path.join(OUT, name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "tokenizer.json")
        tok.save(path)
        fast = LlamaTokenizerFast(tokenizer_file=path, legacy=legacy)
        fast.save_pretrained(folder)
        for extra in ("special_tokens_map.json", "chat_template.jinja"):
            if os.path.exists(os.path.join(folder, extra)):
                os.remove(os.path.join(folder, extra))
        write_tokens(folder)


def main():
    bytelevel_fixtures(train_bytelevel())
    llama_fixtures()
    print("wrote", OUT)


if __name__ == "__main__":
    main()
