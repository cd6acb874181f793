"""The `tuneforge` command: parse arguments, build the command's config, call one library function.

train, eval, advise, serve, lab, ui and plan each have a pydantic model in ``tuneforge.config``, built the
same way from an optional YAML ``--config``, ``--set key=value`` overrides and the named flags below.
Library modules are imported inside the command functions (``# start-up time``): ``tuneforge --help``
loads no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tuneforge import __version__
from tuneforge import config as cfg
from tuneforge.errors import ConfigError, user_error_message
from tuneforge.log import emit, set_quiet

# A named flag: its option strings, the config key it sets, extra argparse settings (help, action, metavar).
Flag = tuple[tuple[str, ...], str, dict[str, Any]]

TRAIN_FLAGS: list[Flag] = [
    (("--model",), "model", {}),
    (("--data",), "data.train", {"action": "append", "help": "training data file or builtin:tasks (repeatable)"}),
    (("--method",), "method.name", {"choices": ["full", "freeze", "lora", "qlora"]}),
    (("--output", "-o"), "output_dir", {}),
    (("--max-steps",), "train.max_steps", {}),
    (("--lr",), "train.lr", {}),
    (("--skip-bad",), "data.skip_bad", {"action": "store_true"}),
    (("--threads",), "train.threads", {}),
]
EVAL_FLAGS: list[Flag] = [
    (("--model",), "model", {}),
    (("--adapter",), "adapters", {"action": "append", "help": "a PEFT-format adapter directory (repeatable)"}),
    (("--data",), "data", {}),
    (("--format",), "format", {}),
    (("--metric",), "metrics", {"action": "append", "help": "a metric (repeatable): exact, normalized, contains, "
                                                            "regex, json, json_schema, mc, loss, refusal"}),
    (("--pattern",), "pattern", {}),
    (("--schema",), "schema_file", {}),
    (("--refusal-detector",), "refusal_detector", {}),
    (("--limit",), "limit", {}),
    (("--max-new-tokens",), "max_new_tokens", {}),
    (("--batch-size",), "batch_size", {}),
    (("--system",), "system", {}),
    (("--no-base",), "include_base", {"action": "store_false", "help": "only the adapters, not the base alone"}),
    (("--output", "-o"), "output", {}),
    (("--threads",), "threads", {}),
]
ADVISE_FLAGS: list[Flag] = [
    (("--model",), "model", {}),
    (("--data",), "data", {}),
    (("--shots",), "shots", {"help": "few-shot sizes k, comma-separated (default 1,3,5)"}),
    (("--prompt-file",), "prompt_file", {}),
    (("--metric",), "metric", {}),
    (("--n-test",), "n_test", {}),
    (("--steps",), "train_steps", {}),
    (("--lr",), "lr", {}),
    (("--lora-r",), "lora_r", {}),
    (("--price-per-1k-tokens",), "price_per_1k_tokens", {}),
    (("--output-price-per-1k-tokens",), "output_price_per_1k_tokens", {}),
    (("--finetuned-price-multiplier",), "finetuned_price_multiplier", {}),
    (("--gpu-hour-price",), "gpu_hour_price", {}),
    (("--expected-requests",), "expected_requests", {}),
    (("--seed",), "seed", {}),
    (("--output", "-o"), "output", {}),
    (("--threads",), "threads", {}),
]
SERVE_FLAGS: list[Flag] = [
    (("--model",), "model", {}),
    (("--adapters",), "adapters", {}),
    (("--host",), "host", {}),
    (("--port",), "port", {}),
    (("--api-key",), "api_key", {}),
    (("--max-batch",), "max_batch", {}),
    (("--max-tokens-limit",), "max_tokens_limit", {}),
    (("--max-body-bytes",), "max_body_bytes", {}),
    (("--dtype",), "dtype", {}),
    (("--device",), "device", {}),
    (("--threads",), "threads", {}),
]
LAB_FLAGS: list[Flag] = [
    (("--quick",), "quick", {"action": "store_true"}),
    (("--output", "-o"), "output", {}),
    (("--general-text",), "general_text", {}),
    (("--threads",), "threads", {}),
]
UI_FLAGS: list[Flag] = [
    (("--runs",), "runs_dir", {}),
    (("--host",), "host", {}),
    (("--port",), "port", {}),
    (("--token",), "token", {}),
    (("--serve-url",), "serve_url", {}),
]
PLAN_FLAGS: list[Flag] = [
    (("--model",), "model", {"help": "a model reference, or a shape: llama-3.2-1b, llama-3-8b, llama-3-70b"}),
    (("--method",), "method.name", {"choices": ["full", "freeze", "lora", "qlora"]}),
    (("--seq",), "data.max_seq_len", {"help": "tokens per row"}),
    (("--batch",), "train.batch_size", {"help": "rows per micro-batch, all GPUs together"}),
    (("--gpus",), "gpus", {}),
    (("--gpu-mem",), "gpu_mem", {}),
    (("--recompute",), "train.gradient_checkpointing", {"choices": ["auto", "off", "on", "offload"],
                                                         "help": "activation recomputation; auto: what train "
                                                                 "would pick"}),
    (("--lora-r",), "method.lora.r", {}),
    (("--lora-dropout",), "method.lora.dropout", {}),
    (("--targets",), "method.lora.target_modules", {"help": "LoRA targets: all-linear or q_proj,v_proj,..."}),
    (("--dtype",), "train.dtype", {"choices": ["bf16", "fp32"]}),
    (("--loss-chunk-tokens",), "train.loss_chunk_tokens", {}),
    (("--grad-accum",), "train.grad_accum", {}),
]


# Config keys that name the command's output folder.
OUTPUT_KEYS = ("output_dir", "output")


def add_config_options(p: argparse.ArgumentParser, schema: type[BaseModel], flags: list[Flag]) -> None:
    """``--config``, ``--set`` and the named flags of a command; each flag's help is its key's description."""
    p.add_argument("--config", "-c", help=f"YAML file of {schema.__name__} keys (docs/configuration.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key, e.g. --set train.lr=1e-4 (repeatable; the value is YAML)")
    for options, key, extra in flags:
        extra = dict(extra)
        text = extra.pop("help", None) or field_description(schema, key)
        p.add_argument(*options, dest=dest_of(key), default=None, help=f"{text} (sets {key})", **extra)
    p.set_defaults(schema=schema, flags=flags)


def dest_of(key: str) -> str:
    return "key_" + key.replace(".", "__")


def field_description(schema: type[BaseModel], key: str) -> str:
    """The description of a dotted key of a config model."""
    model: Any = schema
    for part in key.split("."):
        field = model.model_fields[part]
        model = field.annotation
    return field.description or ""


def config_of(args: argparse.Namespace) -> Any:
    """The command's config model: YAML ← --set ← named flags, errors naming the key and the flag."""
    values, names = {}, {}
    for options, key, _ in args.flags:
        value = getattr(args, dest_of(key))
        if value is not None:
            values[key], names[key] = value, options[0]
    config = cfg.load_config(args.config, args.overrides, values, schema=args.schema, flag_names=names)
    for key in OUTPUT_KEYS:
        out = getattr(config, key, None)
        if out is not None and Path(out).exists() and not Path(out).is_dir():
            raise ConfigError(f"{key} ({names.get(key, '--set ' + key)}): '{out}' is an existing file; give a "
                                  "folder path (a new one, or an earlier output of this command)")
    return config


def cmd_train(args: argparse.Namespace) -> None:
    from tuneforge.train.loop import train  # start-up time

    config = config_of(args)
    args.run_dir = Path(config.output_dir)  # where a bug's traceback goes, once the run has its marker
    check_device(config.train.device, "train.device")
    use_threads(config.train.threads)
    callbacks, tokenizer = [], None
    if config.train.forgetting is not None:
        from tuneforge.eval.forgetting import forgetting_callback  # start-up time
        from tuneforge.models.load import load_tokenizer  # start-up time

        tokenizer = load_tokenizer(config.model, config.trust_remote_code)
        callbacks.append(forgetting_callback(config.train.forgetting, tokenizer))
    train(config, resume=args.resume or args.resume_with_changes, overwrite=args.overwrite, callbacks=callbacks,
          tokenizer=tokenizer, resume_with_changes=args.resume_with_changes)


def cmd_eval(args: argparse.Namespace) -> None:
    from tuneforge.eval.run import format_report, run_eval  # start-up time

    c = config_of(args)
    use_threads(c.threads)
    report = run_eval(c.model, c.data, adapters=c.adapters, metrics=c.metrics, output=c.output, pattern=c.pattern,
                      schema_path=c.schema_file, refusal_detector=c.refusal_detector, limit=c.limit,
                      max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, include_base=c.include_base,
                      format=c.format, system_prompt=c.system, overwrite=args.overwrite)
    emit(format_report(report))


def cmd_advise(args: argparse.Namespace) -> None:
    from tuneforge.eval.advise import AdviseOptions, format_advice, run_advise  # start-up time

    c = config_of(args)
    use_threads(c.threads)
    advice = run_advise(AdviseOptions(**c.model_dump() | {"shots": tuple(c.shots)}))
    emit(format_advice(advice))
    emit("\n".join(f"{k:<10} {v}" for k, v in advice.files.items()))


def cmd_serve(args: argparse.Namespace) -> None:
    import os  # start-up time

    from tuneforge.serve import ServeOptions, serve  # start-up time

    c = config_of(args)
    check_device(c.device, "device")
    use_threads(c.threads)
    key = c.api_key if c.api_key is not None else os.environ.get("TUNEFORGE_API_KEY")  # "" is refused, not "no key"
    serve(ServeOptions(**c.model_dump(exclude={"threads"}) | {"api_key": key}))


def cmd_lab(args: argparse.Namespace) -> None:
    from tuneforge.report.lab import run_lab  # start-up time

    c = config_of(args)
    use_threads(c.threads)
    result = run_lab(output=c.output, quick=c.quick, general_text=c.general_text, threads=c.threads)
    emit(f"lab ({result.mode}) finished in {result.seconds / 60:.1f} min")
    emit("\n".join(f"{k:<9} {v}" for k, v in result.files.items()))


def cmd_ui(args: argparse.Namespace) -> None:
    from tuneforge.ui.app import serve_ui  # start-up time

    c = config_of(args)
    serve_ui(Path(c.runs_dir), host=c.host, port=c.port, token=c.token, serve_url=c.serve_url)


def cmd_plan(args: argparse.Namespace) -> None:
    from tuneforge.train.plan import plan_for_config  # start-up time

    c = config_of(args)
    plan = plan_for_config(c, gpus=c.gpus, gpu_mem_gib=c.gpu_mem)
    auto = c.train.gradient_checkpointing == "auto"
    emit(f"recomputation: {plan.recompute}" + (" (chosen as train's auto would)" if auto else ""))
    emit(plan.table())


def cmd_inspect(args: argparse.Namespace) -> None:
    from tuneforge.data.inspect import format_report, inspect_data  # start-up time
    from tuneforge.models.load import load_tokenizer  # start-up time

    fields = field_mapping(args.field)
    use_threads(args.threads)
    report = inspect_data(args.files, load_tokenizer(args.model), args.max_seq_len, Path(args.out),
                          n_show=args.show, format=args.format, fields=fields)
    emit(format_report(report))


def cmd_generate(args: argparse.Namespace) -> None:
    from tuneforge.eval.interactive import load_prompts, run_generate  # start-up time

    prompts = load_prompts(args.prompt, args.file)
    use_threads(args.threads)
    for prompt, out in zip(prompts, run_generate(args.model, args.adapter, prompts, args.max_new_tokens,
                                                 args.temperature, args.top_p, args.batch_size), strict=True):
        emit(f">>> {prompt}\n{out}\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from tuneforge.eval.interactive import chat_loop  # start-up time

    use_threads(args.threads)
    chat_loop(args.model, args.adapter, args.max_new_tokens, args.temperature, args.system)


def cmd_demo(args: argparse.Namespace) -> None:
    from tuneforge.demo import run_demo, run_dpo_demo  # start-up time

    use_threads(args.threads)
    if args.dpo:
        run_dpo_demo(output_dir=args.output or "runs/demo-dpo", steps=args.steps, overwrite=args.overwrite)
    else:
        run_demo(output_dir=args.output or "runs/demo", steps=args.steps, overwrite=args.overwrite)


def cmd_adapters_list(args: argparse.Namespace) -> None:
    from tuneforge.adapters.manager import format_table, scan_adapters  # start-up time

    infos, errors = scan_adapters(args.dir)
    emit(format_table(infos, errors) if infos or errors else f"no adapters in {args.dir}")


def cmd_adapters_info(args: argparse.Namespace) -> None:
    from tuneforge.adapters.manager import adapter_info, format_info  # start-up time

    emit(format_info(adapter_info(args.adapter)))


def cmd_adapters_merge(args: argparse.Namespace) -> None:
    import torch  # start-up time

    from tuneforge.adapters.export import export_merged  # start-up time

    out = export_merged(args.model, args.adapter, args.out, dtype=getattr(torch, args.dtype),
                        overwrite=args.overwrite)
    emit(f"merged model written to {out}")


def cmd_adapters_combine(args: argparse.Namespace) -> None:
    from tuneforge.adapters.combine import combine_adapters  # start-up time

    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError as e:
        raise ConfigError(f"--weights {args.weights!r}: give comma-separated numbers, e.g. 0.5,0.5") from e
    result = combine_adapters(args.adapter, weights, args.out, method=args.method, rank=args.rank)
    emit(f"{result.method} combination written to {result.path}: rank {result.r}, "
         f"relative Frobenius error {result.relative_error:.3g} (worst module {result.max_module_error:.3g})")


def use_threads(threads: int | None) -> None:
    """Set torch's CPU threads before the library runs: ``threads``, else the one default rule."""
    from tuneforge.models.threads import apply_threads  # start-up time

    apply_threads(threads)


def check_device(name: str, key: str) -> None:
    """Refuse a CUDA device on a machine without one before anything loads, naming the key."""
    if not name.startswith("cuda"):
        return
    import torch  # start-up time

    if not torch.cuda.is_available():
        raise ConfigError(f"{key}: '{name}' but this machine has no CUDA GPU that torch can use; set {key} to "
                          "cpu (or auto)")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{key}: '{name}' but this machine has {torch.cuda.device_count()} GPU(s) "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def field_mapping(items: list[str] | None) -> dict[str, str] | None:
    """``--field CANONICAL=COLUMN`` values as a dict; a value without ``=`` is a ConfigError naming it."""
    if not items:
        return None
    for kv in items:
        if "=" not in kv or not kv.split("=", 1)[0] or not kv.split("=", 1)[1]:
            raise ConfigError(f"--field {kv!r}: write CANONICAL=COLUMN, e.g. --field instruction=question "
                              "(your column 'question' read as the field 'instruction')")
    return dict(kv.split("=", 1) for kv in items)


def positive_int(text: str) -> int:
    """An argparse type: a whole number > 0."""
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}")
    return int(text)


def seq_len(text: str) -> int:
    """An argparse type: a sequence length of at least 16 tokens (as ``data.max_seq_len``)."""
    n = positive_int(text)
    if n < 16:
        raise argparse.ArgumentTypeError(f"expected at least 16 tokens (as data.max_seq_len), got {n}")
    return n


def threads_option() -> argparse.ArgumentParser:
    """``--threads`` of the commands that have no config model."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the physical cores this process "
                                                        "may use, or $OMP_NUM_THREADS)")
    return p


def quiet_option() -> argparse.ArgumentParser:
    """``--quiet`` and ``--allow-pickle``, shared by every command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quiet", "-q", action="store_true", help="print only warnings, errors and the result")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a model folder whose weights are only .bin/.pt pickle files (read with "
                        "torch.load(weights_only=True)); sets TUNEFORGE_ALLOW_PICKLE=1")
    return p


def add_configured_commands(sub, common: list[argparse.ArgumentParser]) -> None:
    """The commands built from a config model: train, eval, advise, serve, lab, ui, plan."""
    p = sub.add_parser("train", parents=common, help="fine-tune a model (full, freeze, lora or qlora)")
    add_config_options(p, cfg.RunConfig, TRAIN_FLAGS)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="resume and accept changed max_steps/epochs/eval_every/save_every/threads/device/forgetting")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=cmd_train)

    for name, schema, flags, func, text in (
        ("eval", cfg.EvalConfig, EVAL_FLAGS, cmd_eval, "evaluate a model and adapters side by side: generation "
         "metrics, multiple choice, loss/perplexity, refusal rate; per task; table + PNG"),
        ("advise", cfg.AdviseConfig, ADVISE_FLAGS, cmd_advise, "prompt or fine-tune? zero-/few-shot/your prompt "
         "vs a short LoRA fine-tune: accuracy, tokens, latency, cost, break-even, recommendation"),
        ("serve", cfg.ServeConfig, SERVE_FLAGS, cmd_serve,
         "OpenAI-compatible HTTP API: one base model, the adapters of a directory"),
        ("lab", cfg.LabConfig, LAB_FLAGS, cmd_lab, "measure each claim of the fine-tuning lesson on the builtin "
         "SmolLM2: Markdown + HTML report with plots"),
        ("ui", cfg.UiConfig, UI_FLAGS, cmd_ui, "a local dashboard over run directories: runs, live curves, "
         "compare, chat with a tuneforge serve"),
        ("plan", cfg.PlanConfig, PLAN_FLAGS, cmd_plan,
         "predict a run's peak GPU memory (weights, gradients, optimizer, activations)"),
    ):
        p = sub.add_parser(name, parents=common, help=text)
        add_config_options(p, schema, flags)
        p.set_defaults(func=func)
        if name == "eval":
            p.add_argument("--overwrite", action="store_true", help="replace --output when it is an earlier evaluation")


def add_adapter_commands(sub, common: list[argparse.ArgumentParser]) -> None:
    """`tuneforge adapters list|info|merge|combine`."""
    adapters = sub.add_parser("adapters", help="inspect, merge and combine LoRA adapters (PEFT format)")
    cmds = adapters.add_subparsers(dest="adapters_command", required=True)
    p = cmds.add_parser("list", parents=common, help="the adapters in a directory: name, rank, alpha, targets, size")
    p.add_argument("dir")
    p.set_defaults(func=cmd_adapters_list)
    p = cmds.add_parser("info", parents=common, help="details of one adapter directory")
    p.add_argument("adapter")
    p.set_defaults(func=cmd_adapters_info)
    p = cmds.add_parser("merge", parents=common,
                        help="merge an adapter into its base and save a Hugging Face model directory")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_adapters_merge)
    p = cmds.add_parser("combine", parents=common, help="combine adapters into a new one (cat: exact; linear; svd)")
    p.add_argument("--adapter", action="append", required=True, help="an adapter directory (repeatable)")
    p.add_argument("--weights", help="comma-separated, one per adapter (default 1 each)")
    p.add_argument("--method", choices=["cat", "linear", "svd"], default="cat")
    p.add_argument("--rank", type=int, help="target rank for --method svd")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_adapters_combine)


def add_tool_commands(sub, common: list[argparse.ArgumentParser]) -> None:
    """`tuneforge data inspect`, `generate`, `chat` and `demo`."""
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    common = [*common, threads_option()]
    p = data.add_parser("inspect", parents=common,
                        help="formats, counts, token lengths and the loss mask of data files")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default="smollm2-135m", help="tokenizer and chat template to use")
    p.add_argument("--max-seq-len", type=seq_len, default=512, help="row length in tokens (at least 16)")
    p.add_argument("--format", default="auto")
    p.add_argument("--field", action="append", metavar="CANONICAL=COLUMN", help="field mapping")
    p.add_argument("--show", type=int, default=3, help="examples to render with the loss mask")
    p.add_argument("--out", default="runs/inspect", help="where the histogram PNG goes")
    p.set_defaults(func=cmd_inspect)

    for name, helptext in (("generate", "generate completions for prompts"), ("chat", "interactive chat")):
        p = sub.add_parser(name, parents=common, help=helptext)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--adapter", help="a PEFT-format LoRA adapter directory")
        p.add_argument("--max-new-tokens", type=positive_int, default=128)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        if name == "generate":
            p.add_argument("prompt", nargs="*", help="prompts (user messages)")
            p.add_argument("--file", help="a text file with one prompt per line, or a JSONL of records")
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--batch-size", type=positive_int, default=16)
            p.set_defaults(func=cmd_generate)
        else:
            p.add_argument("--system", help="system prompt")
            p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", parents=common,
                       help="LoRA-fine-tune the builtin SmolLM2 on builtin:tasks, before/after")
    p.add_argument("--output", default=None, help="run directory (default runs/demo, or runs/demo-dpo with --dpo)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the demo's)")
    p.add_argument("--dpo", action="store_true", help="DPO on builtin preference pairs instead: preference accuracy "
                                                      "and answers before/after")
    p.add_argument("--overwrite", action="store_true", help="replace --output when it is an earlier demo run")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = [quiet_option()]
    add_configured_commands(sub, common)
    add_tool_commands(sub, common)
    add_adapter_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done; 2 a problem the user can fix (one message, no traceback); 1 a bug in
    tuneforge (a short note, the traceback saved to a file); 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    set_quiet(args.quiet)
    try:
        if args.allow_pickle:
            from tuneforge.models.load import ALLOW_PICKLE_ENV  # start-up time

            os.environ[ALLOW_PICKLE_ENV] = "1"  # an environment variable reaches every loader and torchrun's workers
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure ends in one message: the user's to fix (2) or a bug of ours (1)
        message = user_error_message(e)
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
            return 2
        report = save_traceback(e, getattr(args, "run_dir", None))
        print(f"error: this is a bug in tuneforge, please report it: {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}; the traceback is in {report}", file=sys.stderr)
        return 1
    return 0


def save_traceback(e: BaseException, run_dir: Path | None) -> Path:
    """Write the traceback into the run directory when there is one (it carries ``tuneforge-run.json``), else
    into ``<tmp>/tuneforge-crashes``; return the file's path."""
    folder = Path(tempfile.gettempdir()) / "tuneforge-crashes"
    if run_dir is not None:
        from tuneforge.train.rundir import MARKER  # start-up time

        folder = run_dir if (run_dir / MARKER).is_file() else folder
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = f"tuneforge {__version__}, argv {sys.argv}\n" + "".join(traceback.format_exception(e))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-{stamp}-{os.getpid()}.txt"
        path.write_text(text, encoding="utf-8")
    except OSError:  # an unwritable run dir must not hide the bug: fall back to stderr
        print(text, file=sys.stderr)
        return Path("<stderr>")
    return path


if __name__ == "__main__":
    sys.exit(main())
