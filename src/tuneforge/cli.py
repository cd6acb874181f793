"""The `tuneforge` command: parse arguments, build the config, call one library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuneforge.errors import TuneforgeError


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--model", help="model reference (sets model=)")
    p.add_argument("--data", action="append", help="training data file or builtin:tasks (repeatable)")
    p.add_argument("--method", choices=["full", "freeze", "lora", "qlora"], help="sets method.name=")
    p.add_argument("--output", "-o", help="run directory (sets output_dir=)")
    p.add_argument("--max-steps", type=int, help="sets train.max_steps=")
    p.add_argument("--lr", type=float, help="sets train.lr=")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records and report them")


def overrides_of(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    named = {"model": args.model, "method.name": args.method, "output_dir": args.output,
             "train.max_steps": args.max_steps, "train.lr": args.lr}
    out += [f"{k}={v}" for k, v in named.items() if v is not None]
    if args.data:
        out.append("data.train=[" + ", ".join(f'"{d}"' for d in args.data) + "]")
    if args.skip_bad:
        out.append("data.skip_bad=true")
    return out


def cmd_train(args: argparse.Namespace) -> None:
    from tuneforge.config import load_config
    from tuneforge.train.loop import train

    train(load_config(args.config, overrides_of(args)), resume=args.resume, overwrite=args.overwrite)


def cmd_inspect(args: argparse.Namespace) -> None:
    from tuneforge.data.inspect import format_report, inspect_data
    from tuneforge.models.load import load_tokenizer

    fields = dict(kv.split("=", 1) for kv in args.field) if args.field else None
    report = inspect_data(args.files, load_tokenizer(args.model), args.max_seq_len, Path(args.out),
                          n_show=args.show, format=args.format, fields=fields)
    print(format_report(report))


def cmd_generate(args: argparse.Namespace) -> None:
    from tuneforge.eval.interactive import load_prompts, run_generate

    prompts = load_prompts(args.prompt, args.file)
    for prompt, out in zip(prompts, run_generate(args.model, args.adapter, prompts, args.max_new_tokens,
                                                 args.temperature, args.top_p, args.batch_size), strict=True):
        print(f">>> {prompt}\n{out}\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from tuneforge.eval.interactive import chat_loop

    chat_loop(args.model, args.adapter, args.max_new_tokens, args.temperature, args.system)


def cmd_demo(args: argparse.Namespace) -> None:
    from tuneforge.demo import run_demo

    run_demo(output_dir=args.output, steps=args.steps)


def cmd_adapters_list(args: argparse.Namespace) -> None:
    from tuneforge.adapters.manager import format_table, scan_adapters

    infos, errors = scan_adapters(args.dir)
    if not infos and not errors:
        print(f"no adapters in {args.dir}")
        return
    print(format_table(infos, errors))


def cmd_adapters_info(args: argparse.Namespace) -> None:
    from tuneforge.adapters.manager import adapter_info, format_info

    print(format_info(adapter_info(args.adapter)))


def cmd_adapters_merge(args: argparse.Namespace) -> None:
    import torch

    from tuneforge.adapters.export import export_merged

    out = export_merged(args.model, args.adapter, args.out, dtype=getattr(torch, args.dtype),
                        overwrite=args.overwrite)
    print(f"merged model written to {out}")


def cmd_adapters_combine(args: argparse.Namespace) -> None:
    from tuneforge.adapters.combine import combine_adapters
    from tuneforge.errors import ConfigError

    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError as e:
        raise ConfigError(f"--weights {args.weights!r}: give comma-separated numbers, e.g. 0.5,0.5") from e
    result = combine_adapters(args.adapter, weights, args.out, method=args.method, rank=args.rank)
    print(f"{result.method} combination written to {result.path}: rank {result.r}, "
          f"relative Frobenius error {result.relative_error:.3g} (worst module {result.max_module_error:.3g})")


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from tuneforge.serve import ServeOptions, serve

    serve(ServeOptions(model=args.model, adapters=args.adapters, host=args.host, port=args.port,
                       api_key=args.api_key or os.environ.get("TUNEFORGE_API_KEY"), max_batch=args.max_batch,
                       max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                       dtype=args.dtype, device=args.device))


def add_adapter_commands(sub) -> None:
    """`tuneforge adapters list|info|merge|combine`."""
    adapters = sub.add_parser("adapters", help="inspect, merge and combine LoRA adapters (PEFT format)")
    cmds = adapters.add_subparsers(dest="adapters_command", required=True)
    p = cmds.add_parser("list", help="the adapters in a directory: name, rank, alpha, targets, size")
    p.add_argument("dir")
    p.set_defaults(func=cmd_adapters_list)
    p = cmds.add_parser("info", help="details of one adapter directory")
    p.add_argument("adapter")
    p.set_defaults(func=cmd_adapters_info)
    p = cmds.add_parser("merge", help="merge an adapter into its base and save a Hugging Face model directory")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_adapters_merge)
    p = cmds.add_parser("combine", help="combine adapters into a new one (cat: exact; linear; svd)")
    p.add_argument("--adapter", action="append", required=True, help="an adapter directory (repeatable)")
    p.add_argument("--weights", help="comma-separated, one per adapter (default 1 each)")
    p.add_argument("--method", choices=["cat", "linear", "svd"], default="cat")
    p.add_argument("--rank", type=int, help="target rank for --method svd")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_adapters_combine)


def cmd_eval(args: argparse.Namespace) -> None:
    from tuneforge.eval.run import format_report, run_eval

    report = run_eval(args.model, args.data, adapters=args.adapter or [], metrics=args.metric,
                      output=args.output, pattern=args.pattern, schema_path=args.schema,
                      refusal_detector=args.refusal_detector, limit=args.limit,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      include_base=not args.no_base, system_prompt=args.system)
    print(format_report(report))


def cmd_advise(args: argparse.Namespace) -> None:
    from tuneforge.errors import ConfigError
    from tuneforge.eval.advise import AdviseOptions, format_advice, run_advise

    try:
        shots = tuple(int(k) for k in args.shots.split(","))
    except ValueError as e:
        raise ConfigError(f"--shots {args.shots!r}: give comma-separated numbers, e.g. 1,3,5") from e
    opts = AdviseOptions(data=args.data, model=args.model, shots=shots, prompt_file=args.prompt_file,
                         metric=args.metric, n_test=args.n_test, train_steps=args.steps, lr=args.lr,
                         lora_r=args.lora_r, price_per_1k_tokens=args.price_per_1k_tokens,
                         output_price_per_1k_tokens=args.output_price_per_1k_tokens,
                         finetuned_price_multiplier=args.finetuned_price_multiplier,
                         gpu_hour_price=args.gpu_hour_price, expected_requests=args.expected_requests,
                         output=args.output, seed=args.seed)
    advice = run_advise(opts)
    print(format_advice(advice))
    print("\n".join(f"{k:<10} {v}" for k, v in advice.files.items()))


def cmd_lab(args: argparse.Namespace) -> None:
    from tuneforge.report.lab import run_lab

    result = run_lab(output=args.output, quick=args.quick, general_text=args.general_text, threads=args.threads)
    print(f"lab ({result.mode}) finished in {result.seconds / 60:.1f} min")
    print("\n".join(f"{k:<9} {v}" for k, v in result.files.items()))


def add_eval_commands(sub) -> None:
    """`tuneforge eval`, `tuneforge advise` and `tuneforge lab`."""
    from tuneforge.eval.run import METRICS

    p = sub.add_parser("eval", help="evaluate a model and adapters side by side: generation metrics, multiple "
                                    "choice, loss/perplexity, refusal rate; per task; table + PNG")
    p.add_argument("--model", default="smollm2-135m", help="base model reference")
    p.add_argument("--adapter", action="append", help="a PEFT-format adapter directory (repeatable)")
    p.add_argument("--data", required=True, help="evaluation file (any training format; see README) or "
                                                 "builtin:tasks|refusal|probes")
    p.add_argument("--metric", action="append", choices=METRICS, help="repeatable; default: what the data supports")
    p.add_argument("--pattern", help="regular expression for --metric regex (else each record's 'pattern')")
    p.add_argument("--schema", help="JSON Schema file for --metric json_schema (else each record's 'schema')")
    p.add_argument("--refusal-detector", help="package.module:function replacing the default refusal detector")
    p.add_argument("--limit", type=int, help="evaluate N records, evenly spread over the file")
    p.add_argument("--max-new-tokens", type=int, help="default: the longest reference + 8")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--system", help="system prompt for every record")
    p.add_argument("--no-base", action="store_true", help="only the adapters, not the base model alone")
    p.add_argument("--output", "-o", default="runs/eval", help="where results.json, predictions and PNGs go")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("advise", help="prompt or fine-tune? zero-/few-shot/your prompt vs a short LoRA fine-tune: "
                                      "accuracy, tokens, latency, cost, break-even, recommendation")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True, help="your task: records with prompts and reference answers")
    p.add_argument("--shots", default="1,3,5", help="few-shot sizes k, comma-separated")
    p.add_argument("--prompt-file", help="your better prompt: a system prompt, or a user template with {input}")
    p.add_argument("--metric", default="normalized",
                   choices=["exact", "normalized", "contains", "regex", "json", "json_schema"])
    p.add_argument("--n-test", type=int, default=50, help="test records (at most half of the data)")
    p.add_argument("--steps", type=int, default=60, help="LoRA fine-tuning steps")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--price-per-1k-tokens", type=float, default=0.0005, help="$ per 1k prompt tokens")
    p.add_argument("--output-price-per-1k-tokens", type=float, help="$ per 1k output tokens (default: same)")
    p.add_argument("--finetuned-price-multiplier", type=float, default=1.0,
                   help="price factor of the fine-tuned model (hosted fine-tunes often cost 1.5-2x)")
    p.add_argument("--gpu-hour-price", type=float, default=2.0, help="$ per hour of the hardware that trains")
    p.add_argument("--expected-requests", type=float, default=1_000_000, help="request volume you expect")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", default="runs/advise")
    p.set_defaults(func=cmd_advise)

    p = sub.add_parser("lab", help="measure each claim of the fine-tuning lesson on the builtin SmolLM2: "
                                   "Markdown + HTML report with plots")
    p.add_argument("--quick", action="store_true", help="the quick mode (about 10 min on 2 CPU cores; full: 45)")
    p.add_argument("--output", "-o", default="runs/lab")
    p.add_argument("--general-text", help="general text for perplexity (default: ../shared/data/general)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.set_defaults(func=cmd_lab)


def cmd_plan(args: argparse.Namespace) -> None:
    from tuneforge.errors import ConfigError
    from tuneforge.methods.setup import gpu_weight_dtype
    from tuneforge.train.plan import choose_plan, plan_memory

    if args.batch % args.gpus:
        raise ConfigError(f"--batch {args.batch} is the global rows per micro-batch (train.batch_size) and must be "
                          f"divisible by --gpus {args.gpus}")

    def plan(recompute: str, advise: bool = True):
        return plan_memory(args.model, method=args.method, seq=args.seq, batch=args.batch // args.gpus,
                           lora_r=args.lora_r, targets=args.targets, gradient_checkpointing=recompute != "off",
                           offload_checkpoints=recompute == "offload", dtype=args.dtype,
                           weight_dtype=gpu_weight_dtype(args.method, args.dtype), gpu_mem_gib=args.gpu_mem,
                           lora_dropout=args.lora_dropout, loss_chunk_tokens=args.loss_chunk_tokens,
                           grad_accum=args.grad_accum, shards=args.gpus, advise=advise)

    mode = choose_plan(lambda m: plan(m, advise=False)) if args.recompute == "auto" else args.recompute
    print(f"recomputation: {mode}" + (" (chosen as train's auto would)" if args.recompute == "auto" else ""))
    print(plan(mode).table())


def add_plan_command(sub) -> None:
    """`tuneforge plan`: predicted peak GPU memory of a run, split, with advice (defaults mirror `train`)."""
    p = sub.add_parser("plan", help="predict a run's peak GPU memory (weights, gradients, optimizer, activations)")
    p.add_argument("--model", required=True,
                   help="local HF dir, builtin model, or a shape: llama-3.2-1b, llama-3-8b, llama-3-70b")
    p.add_argument("--method", choices=["full", "freeze", "lora", "qlora"], default="lora")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row (data.max_seq_len)")
    p.add_argument("--batch", type=int, default=1, help="rows per micro-batch, all GPUs together (train.batch_size)")
    p.add_argument("--gpus", type=int, default=1, help="torchrun processes the batch and the state are split over")
    p.add_argument("--gpu-mem", type=float, help="GPU memory in GiB (default: this machine's GPU, if any)")
    p.add_argument("--recompute", choices=["auto", "off", "on", "offload"], default="auto",
                   help="activation recomputation (train.gradient_checkpointing; auto: what train would pick)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", default="all-linear", help="LoRA targets: all-linear or q_proj,v_proj,...")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="compute dtype")
    p.add_argument("--loss-chunk-tokens", type=int, default=1024)
    p.add_argument("--grad-accum", type=int, default=1)
    p.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model (full, freeze or lora)")
    add_run_options(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("inspect", help="formats, counts, token lengths and the loss mask of data files")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default="smollm2-135m", help="tokenizer and chat template to use")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--format", default="auto")
    p.add_argument("--field", action="append", metavar="CANONICAL=COLUMN", help="field mapping")
    p.add_argument("--show", type=int, default=3, help="examples to render with the loss mask")
    p.add_argument("--out", default="runs/inspect", help="where the histogram PNG goes")
    p.set_defaults(func=cmd_inspect)

    for name, helptext in (("generate", "generate completions for prompts"), ("chat", "interactive chat")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--adapter", help="a PEFT-format LoRA adapter directory")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        if name == "generate":
            p.add_argument("prompt", nargs="*", help="prompts (user messages)")
            p.add_argument("--file", help="a text file with one prompt per line, or a JSONL of records")
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--batch-size", type=int, default=16)
            p.set_defaults(func=cmd_generate)
        else:
            p.add_argument("--system", help="system prompt")
            p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="LoRA-fine-tune the builtin SmolLM2 on builtin:tasks, before/after")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API: one base model, the adapters of a directory")
    p.add_argument("--model", required=True, help="base model reference (HF dir, .gguf, smollm2-135m)")
    p.add_argument("--adapters", required=True, help="folder of adapter folders; add or remove them while it runs")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $TUNEFORGE_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="requests run together in one generate call")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_serve)

    add_adapter_commands(sub)
    add_plan_command(sub)
    add_eval_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TuneforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
