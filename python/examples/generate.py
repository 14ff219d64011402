"""Answers a question with a transformers model and an adapter exported by `meft-worker export`.

    PYTHONPATH=python python python/examples/generate.py --model-dir MODEL_DIR \
        --export runs/x/export --prompt "Which city is the capital of Vengun?"

The prompt goes through the tokenizer's chat template (one user turn, generation prompt added:
meft's `data.template: chatml` for SmolLM2-Instruct); --no-chat uses the bare text. Greedy
decoding, as `meft-worker generate` with its defaults.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import meft_adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="the Hugging Face model folder")
    ap.add_argument("--export", help="the folder meft-worker export wrote; omit for the bare model")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    a = ap.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    model.eval()
    if a.export:
        meft_adapter.attach(model, a.export)
    if a.no_chat:
        ids = tokenizer(a.prompt, return_tensors="pt").input_ids
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}],
                                            add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=a.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())


if __name__ == "__main__":
    main()
