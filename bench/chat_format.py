"""
Has the chat format been learnt? Samples replies from a stage's newest checkpoint and counts those that
end with <|assistant_end|> within max_tokens (issue: at least 90 % of 50 after SFT).

    .venv/bin/python bench/chat_format.py [--storage URI] [--run NAME] [--stage sft] [-n 50] [--max-tokens 256]

Prompts are the user turns of held-out conversations of the stage's own task mixture (test splits).
"""

from __future__ import annotations

import argparse

import torch

from nanochat.config import load_config
from nanochat.generate import generate_batch
from services.storage import open_storage
from trainer.data.tokenizer import load_tokenizer
from trainer.stages.chat import stage_mixture
from trainer.stages.evaluate import load_stage_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default=None)
    parser.add_argument("--run", default="default")
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--stage", default="sft")
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()

    torch.set_num_threads(2)
    cfg = load_config(preset=args.preset, overrides=[f"run={args.run}"])
    storage = open_storage(args.storage)
    tokenizer = load_tokenizer(storage)
    model, step = load_stage_model(storage, cfg.run, args.stage, torch.device("cpu"))
    mixture, _ = stage_mixture(getattr(cfg, "sft" if args.stage == "rl" else args.stage), cfg, "test", storage)
    end = tokenizer.encode_special("<|assistant_end|>")
    ended, lengths = 0, []
    for i in range(args.n):
        conversation = mixture[i % len(mixture)]
        prompt = tokenizer.render_for_completion({"messages": conversation["messages"][:1]})
        completions, _ = generate_batch(model, tokenizer, prompt, num_samples=1, max_tokens=args.max_tokens,
                                        temperature=args.temperature, seed=i)
        reply = completions[0]
        ended += bool(reply) and reply[-1] == end
        lengths.append(len(reply))
    print(f"{args.stage} step {step}: {ended}/{args.n} replies ({100 * ended / args.n:.0f} %) end with "
          f"<|assistant_end|> within {args.max_tokens} tokens; mean reply length {sum(lengths) / len(lengths):.0f} tokens")


if __name__ == "__main__":
    main()
