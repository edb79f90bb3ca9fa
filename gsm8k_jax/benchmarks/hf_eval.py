"""The transformers side of the eval-CLI benchmark: what a researcher's
plain transformers GSM8K loop does, as one process.

Reads prompt strings (one JSON object with "prompt" per line), generates
greedily in static batches of --batch_size in file order with
`Gemma3ForCausalLM.generate` (left padding, the model folder's eos ids),
and writes one {"index", "response"} line per prompt. Imports only torch
and transformers, so its process costs what such a loop costs.

    python -m gsm8k_jax.benchmarks.hf_eval --model_dir DIR --prompts P.jsonl \
        --output OUT.jsonl --batch_size 16 --max_new_tokens 48
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.padding_side = "left"
    model = transformers.Gemma3ForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype)
    )
    model = model.to(device).eval()
    with open(args.prompts, encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    with open(args.output, "w", encoding="utf-8") as out:
        for start in range(0, len(prompts), args.batch_size):
            batch = tokenizer(
                prompts[start : start + args.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,  # the chat template has its <bos>
            ).to(device)
            with torch.inference_mode():
                generated = model.generate(
                    **batch,
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            width = batch["input_ids"].shape[1]
            texts = tokenizer.batch_decode(
                generated[:, width:], skip_special_tokens=True
            )
            for offset, text in enumerate(texts):
                record = {"index": start + offset, "response": text}
                out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
