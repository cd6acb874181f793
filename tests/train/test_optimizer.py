"""bf16 AdamW without lost updates: small updates kept (Kahan, stochastic rounding), exact resume, bytes per
parameter, the config's refusals, a full fine-tune through ``train``, and the fused Triton kernel against the
foreach reference (on a CUDA GPU, or on CPU tensors under Triton's interpreter: ``TRITON_INTERPRET=1``)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from processes import copy_checkpoint, torchrun
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train import optimizer as opt_module
from tuneforge.train.checkpoint import load_checkpoint, save_checkpoint
from tuneforge.train.loop import train
from tuneforge.train.optimizer import BF16AdamW, build_optimizer, bytes_per_param, round_stochastic_, to_bf16_weights
from tuneforge.train.plan import PlanInputs, plan_memory
from tuneforge.train.schedule import make_scheduler

MODES = [("kahan", "fp32"), ("kahan", "bf16"), ("stochastic", "fp32"), ("stochastic", "bf16")]
N, STEPS, LR, WD = 4096, 1000, 1e-4, 0.01

CUDA = torch.cuda.is_available()
needs_fused = pytest.mark.skipif(opt_module.triton is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                                 reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1)")
FUSED_DEVICE = "cuda" if CUDA else "cpu"  # Triton's interpreter runs the kernel on CPU tensors


@pytest.fixture
def fused(monkeypatch):
    """BF16AdamW's fused kernel for every tensor (a CUDA tensor takes it anyway; the interpreter's are on the CPU)."""
    monkeypatch.setattr(opt_module, "_fused_on", lambda t: True)


def drift_run(make, dtype, start, device="cpu"):
    """STEPS AdamW steps with gradients of a steady sign: each update is ~LR, below bf16's half-ulp on [1, 2)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(start.clone().to(device, dtype))
    opt = make([p])
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        p.grad = (0.5 * torch.randn(N, generator=g) + 0.2).to(device, dtype)
        opt.step()
    return p, opt


@pytest.fixture(scope="module")
def start_and_reference():
    start = (1 + torch.rand(N, generator=torch.Generator().manual_seed(2))).bfloat16().float()
    ref, _ = drift_run(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD), torch.float32, start)
    return start, ref.detach()


def test_plain_bf16_adamw_loses_updates_below_the_resolution(start_and_reference):
    start, ref = start_and_reference
    plain, _ = drift_run(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD), torch.bfloat16, start)
    assert (ref - start).mean() < -0.03  # the fp32 reference moves by ~300 updates of 1e-4
    assert torch.equal(plain.detach().float(), start)  # plain bf16 AdamW: not one of them landed


@pytest.mark.parametrize("kernel", ["foreach", pytest.param("fused", marks=needs_fused)])
@pytest.mark.parametrize("rounding,state", MODES)
def test_bf16_adamw_keeps_updates_below_the_resolution(start_and_reference, request, kernel, rounding, state):
    start, ref = start_and_reference
    if kernel == "fused":
        request.getfixturevalue("fused")
    p, opt = drift_run(lambda ps: BF16AdamW(ps, lr=LR, weight_decay=WD, rounding=rounding, state_dtype=state),
                       torch.bfloat16, start, FUSED_DEVICE if kernel == "fused" else "cpu")
    w = p.detach().float().cpu()
    assert p.dtype == torch.bfloat16
    drift, want = (w - start).mean(), (ref - start).mean()
    assert abs(drift - want) < 0.01 * abs(want)  # the accumulated drift of 1000 sub-resolution updates
    if rounding == "kahan":
        assert (w - ref).abs().max() <= 2 ** -7  # every weight within one bf16 ulp of fp32's
        kept = w + opt.state[p]["compensation"].float().cpu()  # weight + compensation: ~16 mantissa bits
        # after 1000 steps: an eighth of an ulp (fp32 moments); bf16 moments add their rounding noise
        assert (kept - ref).abs().max() < (2 ** -10 if state == "fp32" else 2 ** -8)


def test_kahan_matches_torch_adamw_step_by_step_with_large_updates():
    torch.manual_seed(0)
    start = torch.randn(64, 32).bfloat16().float()
    ours = torch.nn.Parameter(start.bfloat16())
    ref = torch.nn.Parameter(start.clone())
    a = BF16AdamW([ours], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
    b = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
    for _ in range(20):
        grad = torch.randn(64, 32).bfloat16()
        ours.grad, ref.grad = grad, grad.float()
        a.step()
        b.step()
    kept = ours.detach().float() + a.state[ours]["compensation"].float()
    torch.testing.assert_close(kept, ref.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.state[ours]["exp_avg_sq"], b.state[ref]["exp_avg_sq"])


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2 ** -9)  # a quarter of the way from 1 to the next bf16 (1 + 2^-7)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    round_stochastic_([out], [x.clone()])
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(out.float().mean().item() - (1.0 + 2 ** -9)) < 2e-5
    neg = torch.empty_like(out)
    round_stochastic_([neg], [-x])
    assert abs(neg.float().mean().item() + 1.0 + 2 ** -9) < 2e-5


def test_work_is_split_into_chunks_the_same_way(monkeypatch):
    """Small CHUNKs (slices of one tensor, several tensors per batch) give the same result as one batch."""
    torch.manual_seed(0)
    shapes = [(33, 7), (5,), (100,), (3, 3)]
    start = [torch.randn(s).bfloat16() for s in shapes]
    grads = [torch.randn(s).bfloat16() for s in shapes]

    def run():
        params = [torch.nn.Parameter(s.clone()) for s in start]
        opt = BF16AdamW(params, lr=1e-3, weight_decay=0.1)
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    whole = run()
    monkeypatch.setattr(opt_module, "CHUNK", 16)
    for a, b in zip(whole, run(), strict=True):
        assert torch.equal(a, b)


def tiny_net(device="cpu"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device)
    to_bf16_weights(net)
    return net


def train_steps(net, opt, sched, first, last):
    for step in range(first, last):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 16, generator=g).bfloat16().to(net[0].weight.device)
        loss = net(x).float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(net.parameters()), 0.5)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kernel", ["foreach", pytest.param("fused", marks=needs_fused)])
@pytest.mark.parametrize("rounding,state", MODES)
def test_resume_from_a_checkpoint_is_exact(tmp_path, request, kernel, rounding, state):
    if kernel == "fused":  # its random draws are seeded from torch's CPU generator, saved with the checkpoint
        request.getfixturevalue("fused")

    def fresh():
        net = tiny_net(FUSED_DEVICE if kernel == "fused" else "cpu")
        opt = BF16AdamW(list(net.parameters()), lr=3e-3, weight_decay=0.1, rounding=rounding, state_dtype=state)
        return net, opt, make_scheduler(opt, 8, 2, "cosine", 0.1)

    net, opt, sched = fresh()
    train_steps(net, opt, sched, 0, 8)

    net2, opt2, sched2 = fresh()
    train_steps(net2, opt2, sched2, 0, 4)
    ckpt = save_checkpoint(tmp_path, 4, net2, opt2, sched2, {})
    train_steps(net2, opt2, sched2, 4, 6)  # runs on past the checkpoint (and its random draws), then dies
    net3, opt3, sched3 = fresh()
    load_checkpoint(ckpt, net3, opt3, sched3)
    train_steps(net3, opt3, sched3, 4, 8)

    for a, b in zip(net.parameters(), net3.parameters(), strict=True):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert value.dtype == opt3.state[b][key].dtype
            assert torch.equal(value, opt3.state[b][key]), key


@pytest.mark.parametrize("weights,state", [("fp32_master", "fp32"), ("bf16_kahan", "fp32"), ("bf16_kahan", "bf16"),
                                           ("bf16_stochastic", "fp32"), ("bf16_stochastic", "bf16")])
def test_bytes_per_parameter_are_what_is_allocated_and_planned(weights, state):
    net = torch.nn.Linear(64, 64, bias=False)
    if weights != "fp32_master":
        to_bf16_weights(net)
    opt = build_optimizer(list(net.parameters()), 1e-3, 0.0, weights, state, torch.device("cpu"))
    net.weight.grad = torch.zeros_like(net.weight)
    opt.step()  # torch's AdamW allocates its state at the first step
    n = net.weight.numel()
    held = {k: v.nbytes // n for k, v in opt.state[net.weight].items() if v.dim() > 0}
    want = bytes_per_param(weights, state)
    assert net.weight.element_size() == want["weight"] and net.weight.grad.element_size() == want["gradient"]
    assert held.get("exp_avg", 0) + held.get("exp_avg_sq", 0) == want["moments"]
    assert held.get("compensation", 0) == want["compensation"]
    plan = plan_memory(PlanInputs("llama-3.2-1b", "full", weights=weights, optimizer_state=state),
                       gpu_mem_gib=140, advise=False)
    assert plan.optimizer == plan.trainable_params * (want["moments"] + want["compensation"])
    assert plan.gradients in (0, plan.trainable_params * want["gradient"])


def test_bf16_kahan_with_bf16_moments_is_10_bytes_per_parameter():
    assert sum(bytes_per_param("bf16_kahan", "bf16").values()) == 10
    assert sum(bytes_per_param("bf16_kahan", "fp32").values()) == 14
    assert sum(bytes_per_param("fp32_master").values()) == 16


def test_to_bf16_weights_leaves_buffers_alone():
    net = torch.nn.BatchNorm1d(4)
    to_bf16_weights(net)
    assert net.weight.dtype == torch.bfloat16 and net.running_mean.dtype == torch.float32


def test_refuses_fp32_parameters():
    with pytest.raises(ConfigError, match="bf16 weights only"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(3))])


@pytest.mark.parametrize("overrides,match", [
    (["method.name=lora", "train.weights=bf16_kahan"], "for method full or freeze"),
    (["method.name=full", "train.optimizer_state=bf16"], "needs bf16 weights"),
    (["method.name=full", "train.weights=bf16_stochastic", "train.dtype=fp32"], "train.dtype=fp32"),
])
def test_config_refuses_what_bf16_weights_cannot_do(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_train_with_bf16_kahan_follows_the_fp32_master_run(tiny_model_dir, alpaca_file, tmp_path, method):
    def run(weights):
        cfg = load_config(overrides=[f"model={tiny_model_dir}", f"data.train=[{alpaca_file}]",
                                     f"output_dir={tmp_path / weights}", "data.max_seq_len=64", "data.val_fraction=0",
                                     "train.batch_size=2", "train.threads=1", f"method.name={method}",
                                     "method.freeze.top_k_layers=1", "train.max_steps=6", "train.lr=1e-3",
                                     f"train.weights={weights}", "train.save_every=3"])
        return train(cfg, quiet=True)

    ref, ours = run("fp32_master"), run("bf16_kahan")
    assert ours.base_weights == "bf16, no fp32 master copy (Kahan-compensated AdamW updates)"  # in the summary
    losses = [[r["loss"] for r in result.metrics] for result in (ref, ours)]
    assert losses[1][-1] < losses[1][0]
    for a, b in zip(*losses, strict=True):
        assert abs(a - b) < 0.02 * a  # bf16 compute and weights, fp32-like updates
    saved = json.loads((tmp_path / "bf16_kahan" / "model" / "config.json").read_text())
    assert saved.get("torch_dtype", saved.get("dtype")) == "bfloat16"


WORKER = """
import json, sys
from tuneforge.config import load_config
from tuneforge.train import distributed
from tuneforge.train.loop import train

losses = {}
for name, spec in json.loads(open(sys.argv[1]).read()).items():
    r = train(load_config(overrides=spec["overrides"]), resume=spec["resume"], quiet=True)
    losses[name] = [m["loss"] for m in r.metrics]
if distributed.is_main():
    open(sys.argv[2], "w").write(json.dumps(losses))
"""


def test_fsdp2_two_processes_train_checkpoint_and_resume(tiny_model_dir, alpaca_file, tmp_path):
    """Under torchrun (gloo, CPU) the state is DTensor-sharded: two processes follow one, their checkpoint holds
    the full fp32 moments and bf16 compensation, and a one-process checkpoint resumes in two where one ends."""

    def overrides(name):
        return [f"model={tiny_model_dir}", f"data.train=[{alpaca_file}]", f"output_dir={tmp_path / name}",
                "data.max_seq_len=64", "data.val_fraction=0", "train.batch_size=4", "train.threads=1",
                "method.name=full", "train.lr=1e-3", "train.max_steps=4", "train.save_every=2",
                "train.weights=bf16_kahan", "train.device=cpu"]  # gloo on the CPU, GPUs or not

    one = [m["loss"] for m in train(load_config(overrides=overrides("one")), quiet=True).metrics]
    copy_checkpoint(tmp_path / "one", tmp_path / "resumed")
    specs = {"two": {"overrides": overrides("two"), "resume": False},
             "resumed": {"overrides": overrides("resumed"), "resume": True}}
    (tmp_path / "spec.json").write_text(json.dumps(specs))
    torchrun(WORKER, tmp_path, str(tmp_path / "spec.json"), str(tmp_path / "losses.json"))
    two = json.loads((tmp_path / "losses.json").read_text())["two"]
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 0.01 * a

    step2 = tmp_path / "two" / "checkpoints" / "step-2"
    state = torch.load(step2 / "state.pt", weights_only=True)["optimizer"]["state"]
    model = load_file(str(step2 / "trainable.safetensors"))
    assert len(state) == len(model)  # gathered whole: as many values as the weights, fp32 moments, bf16 compensation
    assert sum(s["exp_avg"].numel() for s in state.values()) == sum(w.numel() for w in model.values())
    assert {s["exp_avg_sq"].dtype for s in state.values()} == {torch.float32}
    assert {s["compensation"].dtype for s in state.values()} == {torch.bfloat16}
    assert all(s["compensation"].abs().sum() > 0 for s in state.values())

    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("one", "resumed"))
    for k in a:  # two processes sum gradients in another order: a bf16 weight may round to its neighbour
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=2 ** -7, rtol=2 ** -6, msg=k)


def test_kahan_starts_from_the_loaded_fp32_weights():
    """The cast's residual is the first compensation: weight + compensation is the fp32 weight as loaded."""
    torch.manual_seed(0)
    net = torch.nn.Linear(32, 32)
    loaded = {n: p.detach().clone() for n, p in net.named_parameters()}
    residuals = to_bf16_weights(net, keep_residuals=True)
    opt = build_optimizer(list(net.parameters()), 1e-3, 0.0, "bf16_kahan", "fp32", torch.device("cpu"), residuals)
    for name, p in net.named_parameters():
        kept = p.float() + opt.state[p]["compensation"].float()
        torch.testing.assert_close(kept, loaded[name], atol=0, rtol=2 ** -16)
        assert not torch.equal(p.float(), loaded[name])


# --- the fused kernel (CUDA, or TRITON_INTERPRET=1) -------------------------------------------------------------------

def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values around each of ``x``'s values (8 significant bits)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 8)


def rounding_steps(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps ``ours`` is above ``ref``: -1, 0 or 1 for two stochastic roundings of (nearly) the same
    values, 0 on average when both are unbiased."""
    ours, ref = ours.float().cpu().flatten(), ref.float().flatten()
    # (1e-6: the floor of the fp32 math's own rounding, where a moment or weight cancels to near 0)
    steps = (ours - ref) / bf16_ulp(torch.maximum(ours.abs(), ref.abs()).clamp_min(1e-6))
    assert steps.abs().max() <= 1
    return steps


@needs_fused
@pytest.mark.parametrize("rounding,state", MODES)
@pytest.mark.parametrize("wd", [0.0, 1.0])  # lr·wd = 1e-3: an eighth to a quarter of an ulp
def test_fused_kernel_follows_the_foreach_reference(monkeypatch, rounding, state, wd):
    """Step by step from the same weights and state (the CPU reference is given the kernel's state before each
    step), on sizes that are no multiple of the kernel's block."""
    torch.manual_seed(0)
    shapes = [(37, 129), (4099,), (3,)]
    our_params = [torch.nn.Parameter(torch.randn(s).bfloat16().to(FUSED_DEVICE)) for s in shapes]
    ref_params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in shapes]  # given ours each step
    options = {"lr": 1e-3, "weight_decay": wd, "betas": (0.9, 0.99), "eps": 1e-6, "rounding": rounding,
               "state_dtype": state}
    ref, ours = BF16AdamW(ref_params, **options), BF16AdamW(our_params, **options)
    steps = []
    for _ in range(4):
        with torch.no_grad():
            for r, o in zip(ref_params, our_params, strict=True):
                r.copy_(o)
                for key, value in ours.state[o].items():
                    ref.state[r][key].copy_(value)
                r.grad = torch.randn(r.shape).bfloat16()
                o.grad = r.grad.to(FUSED_DEVICE)
        ref.step()
        with monkeypatch.context() as patch:
            patch.setattr(opt_module, "_fused_on", lambda t: True)
            ours.step()
        for r, o in zip(ref_params, our_params, strict=True):
            mine, theirs = ours.state[o], ref.state[r]
            assert float(mine["step"]) == float(theirs["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                assert mine[key].dtype == theirs[key].dtype
                if state == "fp32":
                    torch.testing.assert_close(mine[key].cpu(), theirs[key], msg=key)
                else:
                    steps.append(rounding_steps(mine[key], theirs[key]))
            if rounding == "stochastic":
                steps.append(rounding_steps(o.detach(), r.detach()))
                continue
            w, w_ref = o.detach().float().cpu(), r.detach().float()
            ulp = bf16_ulp(w_ref)
            assert ((w - w_ref).abs() <= ulp).all()  # at most a neighbour, where the two round a tie differently
            assert (w == w_ref).float().mean() > 0.99
            kept = w + mine["compensation"].float().cpu()
            kept_ref = w_ref + theirs["compensation"].float()
            # weight + compensation: the same, but where fp32 rounding took the compensation (at most half the
            # weight's ulp) to a neighbouring bf16
            assert (kept == kept_ref).float().mean() > 0.99
            assert ((kept - kept_ref).abs() <= ulp * 2 ** -8).all()
    if steps:  # ~35,000 roundings: a one-sided rounding (e.g. truncation) would give about 0.5
        assert abs(torch.cat(steps).mean()) < 0.02


@needs_fused
@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
def test_fused_rounding_of_a_known_update(fused, rounding):
    """Weight decay alone takes 1.0 to 1 - 2^-10, a quarter of the way to its lower bf16 neighbour 1 - 2^-8:
    Kahan keeps 1.0 and the exact remainder, stochastic rounding goes down a quarter of the time. bf16 moments
    decaying by the same factor round down a quarter of the time too, independently of each other."""
    torch.manual_seed(0)
    n, f = 200_003, 2 ** -10
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=FUSED_DEVICE))
    opt = BF16AdamW([p], lr=f, weight_decay=1.0, rounding=rounding, state_dtype="bf16")
    p.grad = torch.zeros_like(p)  # m and v stay 0: the update is weight decay alone
    opt.step()
    w = p.detach().float().cpu()
    if rounding == "kahan":
        assert torch.equal(w, torch.ones(n))
        assert torch.equal(opt.state[p]["compensation"].float().cpu(), torch.full((n,), -f))
    else:
        assert set(w.unique().tolist()) == {1 - 2 ** -8, 1.0}
        assert abs(w.mean().item() - (1 - f)) < 2e-5

    q = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=FUSED_DEVICE))
    opt = BF16AdamW([q], lr=0.0, betas=(1 - f, 1 - f), rounding=rounding, state_dtype="bf16")
    for key in ("exp_avg", "exp_avg_sq"):
        opt.state[q][key].fill_(1.0)
    q.grad = torch.zeros_like(q)
    opt.step()
    assert torch.equal(q.detach().float().cpu(), torch.ones(n))  # lr 0: the weight stays
    down = []
    for key in ("exp_avg", "exp_avg_sq"):  # m·(1 - f) + 0 and v·(1 - f) + 0
        value = opt.state[q][key].float().cpu()
        assert set(value.unique().tolist()) == {1 - 2 ** -8, 1.0}
        assert abs(value.mean().item() - (1 - f)) < 2e-5
        down.append(value < 1)
    assert abs((down[0] & down[1]).float().mean().item() - 1 / 16) < 0.005  # independent draws


@needs_fused
def test_fused_stochastic_rounding_is_reproducible_under_manual_seed(fused):
    def run():
        torch.manual_seed(3)
        p = torch.nn.Parameter(torch.ones(5000, dtype=torch.bfloat16, device=FUSED_DEVICE))
        opt = BF16AdamW([p], lr=1e-3, rounding="stochastic", state_dtype="bf16")
        for _ in range(3):
            p.grad = torch.randn(5000).bfloat16().to(FUSED_DEVICE)
            opt.step()
        return p.detach().cpu(), opt.state[p]["exp_avg_sq"].cpu()

    first, second = run(), run()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
