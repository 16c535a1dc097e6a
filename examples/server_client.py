"""A client of `mlx-safesig server` with the official `openai` package: stream a reply and show
the safety signal the server adds to OpenAI's responses.

    mlx-safesig server &                       # the default model on http://127.0.0.1:8080
    python examples/server_client.py "How do I bake bread?"
    python examples/server_client.py --no-stream "How do I bake bread?"
    python examples/server_client.py --jsonl data/harmful.heldout.jsonl --source strongreject --limit 5

Needs `pip install openai`. The safety object is a top-level "safety" field: the openai client
keeps unknown fields, reachable as `response.model_extra["safety"]`.
"""

import argparse
import json
import sys

from openai import OpenAI


def main():
    ap = argparse.ArgumentParser(description="Ask mlx-safesig server and show its safety signal.")
    ap.add_argument("prompt", nargs="?", help="the user message")
    ap.add_argument("--jsonl", default=None, help="instead: ask each row's `text` of this file "
                    "(e.g. the data builder's harmful.heldout.jsonl) and print only its id, the "
                    "query verdict and whether the refusal was inserted")
    ap.add_argument("--source", default=None, help="with --jsonl: only rows of this source")
    ap.add_argument("--limit", type=int, default=5, help="with --jsonl: the first N rows")
    ap.add_argument("--url", default="http://127.0.0.1:8080/v1", help="the server's base URL")
    ap.add_argument("--max-tokens", type=int, default=200, help="maximum tokens to generate")
    ap.add_argument("--no-stream", action="store_true", help="one JSON response, not a stream")
    args = ap.parse_args()
    client = OpenAI(base_url=args.url, api_key="not-needed")
    model = client.models.list().data[0].id
    if args.jsonl:
        return ask_rows(client, model, args)
    if not args.prompt:
        ap.error("give a prompt or --jsonl FILE")
    messages = [{"role": "user", "content": args.prompt}]

    if args.no_stream:
        r = client.chat.completions.create(model=model, messages=messages,
                                           max_tokens=args.max_tokens)
        print(r.choices[0].message.content)
        safety = r.model_extra["safety"]
    else:
        shown, safety = "", None
        for chunk in client.chat.completions.create(model=model, messages=messages,
                                                    max_tokens=args.max_tokens, stream=True):
            choice = chunk.choices[0] if chunk.choices else None
            if "safety" in chunk.model_extra and choice and choice.finish_reason is None:
                for e in chunk.model_extra["safety"]["events"]:  # as they happen
                    if e["kind"] == "refusal-inserted":
                        print(f"\n[refusal inserted at token {e['step']}]", file=sys.stderr)
                    elif e["kind"] == "retracted":  # only when the server runs with --rollback
                        shown = shown[: len(shown) - e["chars"]]
                        print(f"\n[{e['chars']} characters withdrawn; kept:]\n{shown}", end="")
            if choice and choice.delta.content:
                print(choice.delta.content, end="", flush=True)
                shown += choice.delta.content
            if "safety" in chunk.model_extra:
                safety = chunk.model_extra["safety"]  # the last chunk carries the whole object
        print()
    print(f"[query p(malicious) = {safety['query_p']:.3f}; refusal inserted: "
          f"{safety['refusal_inserted']}; {len(safety['events'])} safety events]", file=sys.stderr)


def ask_rows(client, model, args):
    """Each row's text as one user message; prints ids and the safety object only (no text)."""
    rows = [json.loads(line) for line in open(args.jsonl)]
    rows = [r for r in rows if args.source in (None, r.get("source"))][: args.limit]
    inserted = 0
    for r in rows:
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": r["text"]}],
            max_tokens=args.max_tokens)
        safety = out.model_extra["safety"]
        inserted += safety["refusal_inserted"]
        print(f"{r['id'][:12]}  query p {safety['query_p']:.3f}  refusal inserted "
              f"{safety['refusal_inserted']}")
    print(f"refusal inserted in {inserted} of {len(rows)}")


if __name__ == "__main__":
    main()
