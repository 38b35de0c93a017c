"""`adallava`: show what the budget does to one request.

    adallava demo                                   # tiny random model, a real photo, budgets 0.5 .. 1.0
    adallava demo --granularity head --model PATH   # any AdaLLaVA or llava-hf checkpoint directory
    adallava convert SRC DST --vision-tower CLIP    # an official AdaLLaVA checkpoint -> this library's format
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adallava", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="execution plan, FLOPs and measured latency of one request at each budget")
    d.add_argument("--model", default="tiny", help="'tiny' (random, built locally) or a checkpoint directory")
    d.add_argument("--granularity", choices=["layer", "head"], default="layer",
                   help="for 'tiny' and plain llava-hf checkpoints: AdaLLaVA-L (layer) or AdaLLaVA-H (head)")  # fmt: skip
    d.add_argument("--image", help="an image file (default: scikit-learn's sample photo china.jpg)")
    d.add_argument("--question", default="What is the image showing?")
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.add_argument("--budgets", help="comma-separated budgets (default: the model's own steps, 0.5 .. 1.0)")
    d.add_argument("--repeats", type=int, default=3, help="timed runs per budget (the median is shown)")
    c = sub.add_parser("convert", help="an official AdaLLaVA checkpoint (LLaVA-repo format) -> this library's format")
    c.add_argument("src", help="the official checkpoint folder (config.json with model_type ada_llava_llama)")
    c.add_argument("dst", help="output folder (loads with adallava.presets.load)")
    c.add_argument("--vision-tower", help="a local CLIP folder (openai/clip-vit-large-patch14-336) when SRC has none")
    c.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: the source's")
    return p


def convert(args) -> int:
    import json

    from .convert import convert_official

    try:
        summary = convert_official(args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"adallava convert: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {args.dst}: {json.dumps(summary)}")
    return 0


def _plan_string(fractions, num_prefix_layers) -> str:
    """One character per layer: '#' ran fully, '.' skipped, a digit = tenths of its units that ran ('|' after the
    prefix)."""
    chars = []
    for i, f in enumerate(fractions):
        chars.append("#" if f >= 1 else "." if f <= 0 else str(min(9, int(f * 10))))
        if i == num_prefix_layers - 1:
            chars.append("|")
    return "".join(chars)


def demo(args) -> int:
    import statistics
    from pathlib import Path

    import torch
    from PIL import Image

    from .budget import budget_grid, validate_budget
    from .presets import load

    kwargs = {"granularity": args.granularity}
    model, processor = load(args.model, **kwargs)
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            print(f"adallava demo: --image {path}: no such file", file=sys.stderr)
            return 2
        image = Image.open(path).convert("RGB")
    else:
        from sklearn.datasets import load_sample_image

        image = Image.fromarray(load_sample_image("china.jpg"))
    cfg = model.config
    try:
        budgets = budget_grid(cfg) if not args.budgets else [float(b) for b in args.budgets.split(",")]
        validate_budget(budgets, len(budgets), cfg)
    except ValueError as e:
        print(f"adallava demo: --budgets: {e}", file=sys.stderr)
        return 2
    if cfg.granularity == "head" and not args.budgets:
        budgets = budgets[:: cfg.units_per_layer]  # one row per layer's worth of units keeps the table short
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    print(f"model: {args.model}  granularity: {cfg.granularity}  layers: {cfg.num_layers} "
          f"(prefix {cfg.num_prefix_layers})  prompt: {n_prompt} tokens  question: {args.question!r}")  # fmt: skip
    print("plan: '#' layer ran, '.' skipped, digit = tenths of its heads/neuron groups that ran, '|' ends the prefix")
    print(f"{'budget':>7} {'plan':<{cfg.num_layers + 2}} {'GFLOPs':>8} {'prefill ms':>10} {'ms/token':>9}  answer")
    model.generate(**inputs, budget=1.0, max_new_tokens=2)  # warm-up
    for b in budgets:
        runs = [model.generate(**inputs, budget=b, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True)
                for _ in range(max(1, args.repeats))]  # fmt: skip
        out = runs[-1]
        prefill = statistics.median(r.timings["prefill_s"] for r in runs) * 1e3
        steps = max(int(out.num_generated[0]) - 1, 1)
        per_token = statistics.median(r.timings["decode_s"] for r in runs) * 1e3 / steps
        answer = processor.tokenizer.decode(out.sequences[0, n_prompt:], skip_special_tokens=True).strip()
        plan = _plan_string(out.execution_plan[0].tolist(), cfg.num_prefix_layers)
        print(f"{b:>7.3f} {plan:<{cfg.num_layers + 2}} {out.flops[0].item() / 1e9:>8.3f} {prefill:>10.1f} "
              f"{per_token:>9.2f}  {answer[:40]!r}")  # fmt: skip
    if args.model == "tiny":
        print("(the tiny model is random: its answers are noise; the pipelines train it: python -m pipelines.demo)")
    del torch
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command in (None, "demo"):
        if args.command is None:
            args = _parser().parse_args(["demo", *(argv or [])])
        return demo(args)
    if args.command == "convert":
        return convert(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
