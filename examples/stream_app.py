"""A minimal local app on the Python API: stream a reply and show the safety events as they come.

    python examples/stream_app.py [--model DIR] "How do I bake bread?"

Without --model it uses the embedded default model (`mlx_safesig.load()`).
"""

import argparse
import sys

from mlx_safesig import SafesigError, SafetyConfig, load, stream_generate


def main():
    ap = argparse.ArgumentParser(description="Stream a reply with its safety signal.")
    ap.add_argument("prompt", help="the user message")
    ap.add_argument("--model", default=None, help="safety model directory (default: built in)")
    ap.add_argument("--max-tokens", type=int, default=200, help="maximum tokens to generate")
    ap.add_argument("--prefill", default=None, help="assistant text to start the reply with")
    args = ap.parse_args()
    try:
        model, tokenizer = load(args.model)
        messages = [{"role": "user", "content": args.prompt}]
        shown = ""
        for r in stream_generate(model, tokenizer, messages, args.max_tokens,
                                 safety=SafetyConfig(schedule="annealing", rollback=True),
                                 prefill_response=args.prefill):
            for e in r.safety.events:
                if e.kind == "probe" and e.step < 0:
                    print(f"[query verdict: p(malicious) = {e.p:.3f}]", file=sys.stderr)
                elif e.kind == "flip":
                    print(f"\n[flip at token {e.step}: p = {e.p:.3f}]", file=sys.stderr)
                elif e.kind == "refusal-inserted":
                    print(f"\n[refusal inserted at token {e.step}]", file=sys.stderr)
                elif e.kind == "retracted":
                    # a terminal cannot unprint: say what was withdrawn and reprint the kept text
                    shown = shown[: len(shown) - len(e.text)]
                    print(f"\n[{len(e.text)} characters withdrawn; kept:]\n{shown}", end="")
            print(r.text, end="", flush=True)
            shown += r.text
        print()
    except SafesigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
