"""The memory planner: parts add up, methods and checkpointing order as they should, advice, the train
loop's early refusal, the CLI, and the predictions against peaks measured on an H200."""

from __future__ import annotations

import pytest
import torch

from tuneforge.cli import main
from tuneforge.config import validate
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.models.shapes import SMOLLM2_135M, ModelShape, model_shape, shape_config
from tuneforge.train import loop
from tuneforge.train import plan as plan_module
from tuneforge.train.plan import (
    GIB,
    PlanInputs,
    check_memory,
    plan_for_config,
)

torch.set_num_threads(1)


def plan_memory(*args, gpu_mem_gib=None, advise=True, gradient_checkpointing=False, offload_checkpoints=False,
                **kwargs):
    """``plan.plan_memory`` with the checkpointing settings as two flags, as the measurements below record them."""
    flags = ("offload" if offload_checkpoints else "on") if gradient_checkpointing else "off"
    recompute = kwargs.pop("recompute", flags)
    return plan_module.plan_memory(PlanInputs(*args, recompute=recompute, **kwargs), gpu_mem_gib, advise=advise)

# torch.cuda.max_memory_allocated on one H200 (torch 2.11, transformers 5.17, expandable segments), measured by
# benchmarks/qlora_gpu.py on 2026-11-29 (benchmarks/results/qlora_gpu.json): (plan_memory arguments, GiB).
# Benchmark settings: LoRA r=16 on all 7 projections, no dropout, SDPA's causal kernel unless "mask".
MEASURED = [
    (dict(model="llama-3-8b", method="qlora", batch=4, gradient_checkpointing=True), 9.755),
    (dict(model="llama-3-8b", method="qlora", batch=4, gradient_checkpointing=True,
          offload_checkpoints=True), 8.152),
    (dict(model="llama-3-8b", method="qlora", batch=4, gradient_checkpointing=True,
          attention_mask=True), 9.896),
    (dict(model="llama-3-8b", method="qlora", batch=4), 52.602),
    (dict(model="llama-3-70b", method="qlora", batch=1, gradient_checkpointing=True), 43.275),
    (dict(model="llama-3-70b", method="qlora", batch=1, gradient_checkpointing=True,
          offload_checkpoints=True), 41.339),
    (dict(model="llama-3.2-1b", method="full", batch=8, gradient_checkpointing=True), 20.993),
    (dict(model="llama-3.2-1b", method="lora", batch=4), 22.491),
]


@pytest.mark.parametrize(("kwargs", "measured_gib"), MEASURED)
def test_prediction_within_15_percent_of_the_measured_peak(kwargs, measured_gib):
    plan = plan_memory(seq=2048, **kwargs)
    assert abs(plan.allocated / GIB - measured_gib) / measured_gib < 0.15


def test_qlora_weights_equal_what_the_gpu_held():
    # 5.467 GiB allocated after building the 8B QLoRA model (4-bit linears, bf16 embeddings/head, fp32 LoRA).
    plan = plan_memory("llama-3-8b", "qlora", 2048, 4)
    assert plan.weights / GIB == pytest.approx(5.467, rel=0.005)


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_every_part_counts_and_the_verdict_follows_the_gpu(method, ckpt):
    p = plan_memory("llama-3-8b", method, 1024, 2, gradient_checkpointing=ckpt, gpu_mem_gib=80)
    assert min(p.weights, p.optimizer, p.activations) > 0 and p.gradients >= 0
    assert p.fits == (p.peak <= 80 * GIB)
    assert f"{p.peak / GIB:.2f} GiB" in p.table()


@pytest.mark.parametrize("ckpt", [False, True])
def test_qlora_below_lora_below_full(ckpt):
    peaks = {m: plan_memory("llama-3-8b", m, 2048, 4, gradient_checkpointing=ckpt).peak
             for m in ("qlora", "lora", "full")}
    assert peaks["qlora"] < peaks["lora"] < peaks["full"]


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora"])
def test_checkpointing_lowers_activations(method):
    off = plan_memory("llama-3.2-1b", method, 2048, 8)
    on = plan_memory("llama-3.2-1b", method, 2048, 8, gradient_checkpointing=True)
    assert on.activations < off.activations
    assert on.weights == off.weights and on.optimizer == off.optimizer


def test_activations_grow_with_tokens_and_offload_removes_the_layer_inputs():
    small = plan_memory("llama-3-8b", "qlora", 1024, 1)
    big = plan_memory("llama-3-8b", "qlora", 2048, 4)
    assert big.activations > 4 * small.activations  # linear in tokens, plus the loss chunk
    kept = plan_memory("llama-3-8b", "qlora", 2048, 4, gradient_checkpointing=True)
    offloaded = plan_memory("llama-3-8b", "qlora", 2048, 4, gradient_checkpointing=True, offload_checkpoints=True)
    assert offloaded.peak < kept.peak - GIB


def test_trainable_parameters():
    s = model_shape("llama-3-8b")
    assert s.params == 8_030_261_248  # Llama-3-8B
    assert model_shape("llama-3.2-1b").params == 1_235_814_400  # tied embeddings counted once
    full = plan_memory(s, "full", 512, 1)
    assert full.trainable_params == s.params
    assert full.optimizer == 2 * 4 * s.params  # AdamW: two fp32 moments
    lora = plan_memory(s, "lora", 512, 1, lora_r=8, targets=["q_proj", "v_proj"])
    assert lora.trainable_params == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    assert plan_memory(s, "lora", 512, 1, targets="q_proj,v_proj", lora_r=8).trainable_params == lora.trainable_params


def test_model_shape_from_a_name_a_dict_and_an_hf_config():
    from transformers import LlamaConfig

    by_name = model_shape("llama-3-8b")
    cfg = shape_config("llama-3-8b")
    assert model_shape(cfg) == ModelShape(**{**by_name.__dict__, "name": "model"})
    hf = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    assert model_shape(hf).params == by_name.params
    assert model_shape(by_name) is by_name


def test_model_shape_from_a_local_model_directory(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(tmp_path)
    s = model_shape(str(tmp_path))
    assert (s.hidden, s.layers, s.kv_heads, s.head_dim, s.vocab) == (64, 2, 2, 16, 100)


@pytest.mark.parametrize("bad", [
    dict(method="dpo"), dict(seq=0), dict(batch=-1), dict(dtype="int8"), dict(targets=["c_attn"]),
    dict(recompute="sometimes"), dict(model={"hidden_size": 8}),
])
def test_bad_arguments_name_the_key(bad):
    kwargs = {"model": "llama-3-8b", **bad}
    with pytest.raises(ConfigError):
        plan_memory(**kwargs)


def test_advice_when_it_does_not_fit():
    p = plan_memory("llama-3-8b", "lora", 2048, 4, gpu_mem_gib=24)
    assert p.fits is False
    text = "\n".join(p.advice)
    assert "method.name=qlora" in text and "gradient_checkpointing=true" in text
    for line in p.advice:  # every suggestion fits
        assert float(line.rsplit(": ", 1)[1].split()[0]) <= 24
    assert "fits on 24.0 GiB: NO" in p.table()


def test_advice_suggests_a_smaller_batch_with_accumulation():
    p = plan_memory("llama-3-8b", "qlora", 2048, 4, gradient_checkpointing=True, gpu_mem_gib=10)
    assert p.fits is False
    assert any("train.batch_size=" in a and "grad_accum" in a for a in p.advice)


def test_advice_when_nothing_helps_and_when_it_fits():
    hopeless = plan_memory("llama-3-70b", "full", 4096, 8, gpu_mem_gib=16)
    assert len(hopeless.advice) == 1 and "does not fit one GPU" in hopeless.advice[0]
    fine = plan_memory("llama-3.2-1b", "qlora", 512, 1, gpu_mem_gib=80)
    assert fine.fits and "to spare" in fine.advice[0]


def test_unknown_gpu_size(monkeypatch):
    monkeypatch.setattr(plan_module, "_cuda_memory", lambda device=None: None)
    p = plan_memory("llama-3-8b", "qlora", 2048, 1)
    assert p.fits is None and p.advice == []
    assert "fits: unknown" in p.table()


def _config(tmp_path, **train):
    return validate({"model": "llama-3-8b", "output_dir": str(tmp_path / "run"), "method": {"name": "lora"},
                     "data": {"max_seq_len": 2048}, "train": {"batch_size": 4, **train}})


def test_check_memory_refuses_with_the_split_and_advice(tmp_path, monkeypatch):
    with pytest.raises(TuneforgeError) as e:
        check_memory(_config(tmp_path, gradient_checkpointing=False), gpu_mem_gib=24)
    message = str(e.value)
    assert "predicted peak" in message and "activations" in message and "method.name=qlora" in message
    monkeypatch.setenv("TUNEFORGE_SKIP_MEMORY_CHECK", "1")
    assert check_memory(_config(tmp_path, gradient_checkpointing=False), gpu_mem_gib=24).fits is False
    monkeypatch.delenv("TUNEFORGE_SKIP_MEMORY_CHECK")
    assert check_memory(_config(tmp_path, gradient_checkpointing=True), gpu_mem_gib=80).fits


def test_check_memory_stays_out_of_the_way_of_what_it_cannot_model(tmp_path):
    config = _config(tmp_path)
    config.method.lora.target_modules = ["c_attn"]  # not a Llama projection
    assert check_memory(config, gpu_mem_gib=1) is None


def test_train_refuses_a_cuda_run_that_cannot_fit_before_loading_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(plan_module, "_cuda_memory", lambda device=None: 16 * GIB)  # not even offloaded
    with pytest.raises(TuneforgeError, match="predicted not to fit"):
        loop.train(_config(tmp_path))
    assert not (tmp_path / "run").exists()


def test_cli_plan_prints_the_table(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--method", "qlora", "--seq", "2048", "--batch", "4",
                 "--recompute", "on", "--gpu-mem", "24"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer state", "activations", "overhead", "predicted peak",
                 "fits on 24.0 GiB: yes"):
        assert part in out


def test_cli_plan_reports_a_bad_model_without_a_traceback(capsys):
    assert main(["plan", "--model", "no-such-shape-or-dir/x/y", "--method", "lora"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(("method", "weight_dtype", "measured_gib"),
                         [("lora", "bf16", 14.47), ("qlora", "bf16", 10.51), ("full", "fp32", 71.01)])
def test_sharded_plan_matches_the_h200_pair(method, weight_dtype, measured_gib):
    # per-GPU peaks measured by benchmarks/fsdp_gpu.py: 8B, 2 GPUs, 4x2048 per GPU, checkpointing on
    plan = plan_memory("llama-3-8b", method, 2048, 4, gradient_checkpointing=True, weight_dtype=weight_dtype,
                       shards=2, advise=False)
    assert abs(plan.allocated / GIB / measured_gib - 1) < 0.06


def test_plan_under_torchrun_is_per_process(tmp_path, monkeypatch):
    one = plan_for_config(_config(tmp_path, gradient_checkpointing=True), gpu_mem_gib=141)
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = plan_for_config(_config(tmp_path, gradient_checkpointing=True), gpu_mem_gib=141)
    assert two.batch == one.batch // 2
    assert two.weights < one.weights and two.activations < one.activations


def test_cli_plan_picks_recomputation_as_train_would(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--seq", "2048", "--batch", "4", "--gpu-mem", "141"]) == 0
    assert "recomputation: off" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3-8b", "--seq", "2048", "--batch", "4", "--gpu-mem", "32"]) == 0
    assert "recomputation: on" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3-8b", "--batch", "3", "--gpus", "2"]) == 2
    assert "divisible by --gpus 2" in capsys.readouterr().err


# Peak RSS minus the RSS once the model is loaded and prepared (train's ru_maxrss against /proc/self/status VmRSS
# right after prepare_model), SmolLM2-135M LoRA (r=16, all-linear, the defaults: loss chunks of 256 tokens, dropout
# 0.05 so no grouped projections), fp32 on the CPU, 1 thread, torch 2.13, 2 steps of packed builtin:tasks rows
# (measured 2026-12-01): (rows, seq, recompute, GiB).
CPU_MEASURED = [(1, 512, "off", 1.833), (2, 512, "off", 3.161), (2, 512, "on", 1.364)]


def _cpu_config(batch=8, seq=512, **train):
    return validate({"data": {"max_seq_len": seq}, "train": {"batch_size": batch, **train}})


@pytest.mark.parametrize(("rows", "seq", "recompute", "measured_gib"), CPU_MEASURED)
def test_cpu_ram_prediction_covers_the_measured_peak(rows, seq, recompute, measured_gib):
    need = plan_module.cpu_need(plan_module.cpu_plan_inputs(_cpu_config(rows, seq), SMOLLM2_135M, recompute, rows))
    assert measured_gib <= need / GIB <= 1.35 * measured_gib


def test_the_default_cpu_batch_runs_as_smaller_forwards_within_budget():
    config = _cpu_config()  # the default train: 8 rows x 512 tokens
    rows = plan_module.cpu_rows_per_forward(config, SMOLLM2_135M, "off", ram=64 * GIB)
    assert 1 <= rows < 8
    need = plan_module.cpu_need(plan_module.cpu_plan_inputs(config, SMOLLM2_135M, "off", rows))
    assert need <= plan_module.CPU_FORWARD_BUDGET
    assert plan_module.cpu_rows_per_forward(_cpu_config(batch=2, seq=64), SMOLLM2_135M, "off", ram=64 * GIB) == 2


def test_cpu_run_that_cannot_fit_the_ram_is_refused_with_advice(monkeypatch):
    with pytest.raises(TuneforgeError) as e:
        plan_module.cpu_rows_per_forward(_cpu_config(), SMOLLM2_135M, "off", ram=1 * GIB)
    message = str(e.value)
    for advice in ("data.max_seq_len", "method.name=lora", "gradient_checkpointing"):
        assert advice in message
    monkeypatch.setenv("TUNEFORGE_SKIP_MEMORY_CHECK", "1")
    assert plan_module.cpu_rows_per_forward(_cpu_config(), SMOLLM2_135M, "off", ram=1 * GIB) == 1


def test_an_fp8_base_counts_one_byte_per_adapted_weight():
    """Measured on an H200 (8B, LoRA on all 7 projections, 4×2048): the FP8 base's peak is 6.5 GiB below bf16's."""
    from tuneforge.config import load_config
    from tuneforge.train.plan import plan_inputs

    bf16 = plan_memory("llama-3-8b", seq=2048, batch=4, weight_dtype="bf16", gpu_mem_gib=140, advise=False)
    fp8 = plan_memory("llama-3-8b", seq=2048, batch=4, weight_dtype="bf16", base_precision="fp8", gpu_mem_gib=140,
                      advise=False)
    assert (bf16.weights - fp8.weights) / 2**30 == pytest.approx(6.5, abs=0.05)
    assert bf16.activations == fp8.activations
    config = load_config(None, ["method.lora.base_precision=fp8"])
    assert plan_inputs(config, "off", gpus=1).base_precision == "fp8"


def test_qlora_with_fp8_compute_plans_the_memory_of_qlora():
    """QLoRA's base stays 4-bit with FP8 compute (codes are made on the fly): no FP8 weight saving to subtract."""
    from tuneforge.config import load_config
    from tuneforge.train.plan import plan_inputs

    kw = {"seq": 2048, "batch": 4, "method": "qlora", "gpu_mem_gib": 140, "advise": False}
    bf16, fp8 = plan_memory("llama-3-8b", **kw), plan_memory("llama-3-8b", base_precision="fp8", **kw)
    assert (fp8.weights, fp8.activations, fp8.peak) == (bf16.weights, bf16.activations, bf16.peak)
    config = load_config(None, ["method.name=qlora", "method.lora.base_precision=fp8"])
    assert plan_inputs(config, "off", gpus=1).base_precision == "fp8"
