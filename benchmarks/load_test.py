"""Bounded load test of `tuneforge serve`: N concurrent mixed-adapter chat requests over loopback.

Starts a server in this process (``--model`` with ``--adapters DIR``, or ``--make-adapters K``
random LoRA adapters in a temporary folder) or talks to a running one (``--url``, loopback only).
Sends ``--requests`` greedy requests from ``--concurrency`` client threads, round-robin over the
served models (base and adapters), and reports requests/s, latency p50/p90/p99 (and time to first
token with ``--stream``), completion tokens/s and errors. Bounded: a fixed number of requests, a
timeout per request and an overall ``--deadline``; it stops by itself and exits 1 on any error.

    .venv/bin/python benchmarks/load_test.py --model smollm2-135m --make-adapters 2 \\
        --requests 32 --concurrency 8 --max-tokens 16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

PROMPTS = ["Upper-case the word: apple", "What is 2 + 3?", "Name a colour.", "Say hello in French.",
           "Write one word that rhymes with cat.", "What is the capital of France?"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m", help="base model, when this script starts the server")
    p.add_argument("--adapters", help="adapters directory for the server started here")
    p.add_argument("--make-adapters", type=int, default=2, help="random adapters to create when no --adapters")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--stream", action="store_true", help="stream answers and report time to first token")
    p.add_argument("--deadline", type=float, default=600, help="seconds after which no new request is sent")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server started here")
    p.add_argument("--api-key")
    p.add_argument("--json", help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.requests > 10_000:
        p.error("--requests must be 1..10000 and --concurrency at least 1")
    if args.url and urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must be a loopback address (127.0.0.1, localhost or [::1])")
    return args


def make_adapters(model_ref: str, root: Path, count: int) -> None:
    """``count`` LoRA adapters with small random B (different targets and ranks), saved in the PEFT format."""
    import torch

    from tuneforge.methods.lora import apply_lora, lora_layers
    from tuneforge.methods.peft_format import save_adapter
    from tuneforge.models.load import load_model

    base = load_model(model_ref)
    shapes = [(["q_proj", "v_proj"], 8), ("all-linear", 16), (["up_proj", "down_proj"], 4)]
    for i in range(count):
        targets, r = shapes[i % len(shapes)]
        model = copy.deepcopy(base)
        torch.manual_seed(i + 1)
        apply_lora(model, r=r, alpha=2 * r, target_modules=targets)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B["default"].weight.normal_(0, 0.02)
        save_adapter(model, root / f"adapter-{i + 1}", base_model_name_or_path=model_ref)
        del model


def call(url: str, path: str, body: dict | None, api_key: str | None, timeout: float):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if body is None else "POST")
    return urllib.request.urlopen(req, timeout=timeout)


def one_request(url: str, model: str, prompt: str, args, stop_at: float) -> dict:
    """Send one chat request; {ok, latency, ttft, tokens, error}."""
    remaining = stop_at - time.monotonic()
    if remaining <= 0:
        return {"ok": False, "error": "not sent: deadline reached"}
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream": args.stream}
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        with call(url, "/v1/chat/completions", body, args.api_key, timeout=min(remaining, 300)) as resp:
            if not args.stream:
                tokens = json.loads(resp.read())["usage"]["completion_tokens"]
            for line in resp if args.stream else ():
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except urllib.error.HTTPError as e:
        return {"ok": False, "error": f"HTTP {e.code}: {e.read()[:200]!r}"}
    except Exception as e:  # a load test counts failures instead of stopping at the first
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "latency": time.perf_counter() - start, "ttft": ttft, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_load(url: str, args) -> dict:
    with call(url, "/v1/models", None, args.api_key, timeout=60) as resp:
        models = [m["id"] for m in json.loads(resp.read())["data"]]
    stop_at = time.monotonic() + args.deadline
    cases = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda c: one_request(url, c[0], c[1], args, stop_at), cases))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] for r in ok]
    out = {"models": models, "requests": args.requests, "concurrency": args.concurrency,
           "max_tokens": args.max_tokens, "ok": len(ok), "errors": len(results) - len(ok), "wall_s": wall,
           "requests_per_s": len(ok) / wall, "completion_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
           "error_samples": [r["error"] for r in results if not r["ok"]][:5]}
    if lat:
        out.update({f"latency_p{q}_s": percentile(lat, q) for q in (50, 90, 99)})
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    if ttfts:
        out.update({f"ttft_p{q}_s": percentile(ttfts, q) for q in (50, 90)})
    return out


def report(out: dict) -> str:
    lines = [f"models: {', '.join(out['models'])}",
             f"{out['requests']} requests, concurrency {out['concurrency']}, max_tokens {out['max_tokens']}: "
             f"{out['ok']} ok, {out['errors']} errors in {out['wall_s']:.1f} s",
             f"throughput: {out['requests_per_s']:.2f} requests/s, {out['completion_tokens_per_s']:.1f} tokens/s"]
    if "latency_p50_s" in out:
        lines.append("latency: p50 {latency_p50_s:.2f} s, p90 {latency_p90_s:.2f} s, p99 {latency_p99_s:.2f} s"
                     .format(**out))
    if "ttft_p50_s" in out:
        lines.append("time to first token: p50 {ttft_p50_s:.2f} s, p90 {ttft_p90_s:.2f} s".format(**out))
    if "server_batches" in out:
        lines.append(f"server: {out['server_batches']} batches, {out['server_rows_per_batch']:.1f} rows per batch "
                     f"on average, {out['server_mixed_batches']} mixing models")
    lines += [f"error: {e}" for e in out["error_samples"]]
    return "\n".join(lines)


def hard_stop() -> None:
    print("load test: deadline overrun, stopping", file=sys.stderr, flush=True)
    os._exit(2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server, tmp = None, None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            import torch

            from tuneforge.serve import ServeOptions, Server

            torch.set_num_threads(args.threads)
            adapters = args.adapters
            if adapters is None:
                tmp = tempfile.TemporaryDirectory(prefix="tuneforge-load-")
                adapters = tmp.name
                make_adapters(args.model, Path(adapters), args.make_adapters)
            server = Server(ServeOptions(model=args.model, adapters=adapters, port=0, api_key=args.api_key,
                                         max_batch=args.max_batch, max_tokens_limit=args.max_tokens))
            server.start()
            url = server.url
            print(f"server at {url} (torch threads: {args.threads}, max batch: {args.max_batch})", flush=True)
        watchdog = threading.Timer(args.deadline + 360, hard_stop)
        watchdog.daemon = True
        watchdog.start()  # a hard stop, should a request hang past its own timeout
        out = run_load(url, args)
        watchdog.cancel()
        if server is not None:
            stats = server.batcher.stats
            out.update(server_batches=stats.batches, server_mixed_batches=stats.mixed,
                       server_rows_per_batch=stats.rows / max(stats.batches, 1))
    finally:
        if server is not None:
            server.close()
        if tmp is not None:
            tmp.cleanup()
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
