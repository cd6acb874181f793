import pytest
import torch
import torch.nn.functional as F

from tuneforge.errors import ModelError
from tuneforge.train.loss import LogitTransform, chunked_lm_loss, logit_transform, shifted_targets

HIDDEN, VOCAB, BATCH, SEQ = 16, 50, 2, 9


def reference(hidden, head, labels):
    logits = head(hidden).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def make_case(bias: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels[0, :4] = -100
    labels[1, 7] = -100
    return hidden, head, labels


def n_trained(labels):
    return int((labels[:, 1:] != -100).sum())


def grads(hidden, head):
    out = [hidden.grad]
    for p in (head.weight, head.bias):
        out.append(None if p is None else p.grad)
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    return [None if g is None else g.clone() for g in out]


def assert_grads_close(got, want, scale=1.0):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w * scale, atol=1e-5, rtol=1e-4)


def test_shifted_targets():
    labels = torch.tensor([[1, 2, 3], [-100, 5, -100]])
    assert shifted_targets(labels).tolist() == [[2, 3, -100], [5, -100, -100]]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_tokens", [3, 5, 1024])
def test_loss_and_grads_match_full_cross_entropy(bias, chunk_tokens):
    hidden, head, labels = make_case(bias)
    ref = reference(hidden, head, labels)
    ref.backward()
    want = grads(hidden, head)

    loss, n = chunked_lm_loss(hidden, head, labels, chunk_tokens=chunk_tokens)
    assert n == n_trained(labels)
    assert chunk_tokens > n or n > 2 * chunk_tokens - 2  # several chunks, unless the one-chunk case
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert_grads_close(grads(hidden, head), want)


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_gets_no_grad(bias):
    hidden, head, labels = make_case(bias)
    head.requires_grad_(False)
    ref = reference(hidden, head, labels)
    ref.backward()
    want_h = hidden.grad.clone()
    hidden.grad = None

    loss, _ = chunked_lm_loss(hidden, head, labels, chunk_tokens=4)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    torch.testing.assert_close(hidden.grad, want_h, atol=1e-5, rtol=1e-4)
    assert head.weight.grad is None
    if bias:
        assert head.bias.grad is None


def test_head_only_trainable():
    hidden, head, labels = make_case(bias=True)
    hidden = hidden.detach()
    reference(hidden, head, labels).backward()
    want = [None, head.weight.grad.clone(), head.bias.grad.clone()]
    head.zero_grad(set_to_none=True)
    loss, _ = chunked_lm_loss(hidden, head, labels, chunk_tokens=4)
    loss.backward()
    assert_grads_close([hidden.grad, head.weight.grad, head.bias.grad], want)


def test_scaled_loss_scales_grads():
    hidden, head, labels = make_case(bias=True)
    reference(hidden, head, labels).backward()
    want = grads(hidden, head)
    loss, _ = chunked_lm_loss(hidden, head, labels, chunk_tokens=3)
    (loss / 7).backward()
    assert_grads_close(grads(hidden, head), want, scale=1 / 7)


def test_backward_twice_with_retain_graph_accumulates():
    hidden, head, labels = make_case()
    reference(hidden, head, labels).backward()
    want = grads(hidden, head)
    loss, _ = chunked_lm_loss(hidden, head, labels, chunk_tokens=3)
    (loss * 2).backward(retain_graph=True)
    loss.backward()
    assert_grads_close(grads(hidden, head), want, scale=3.0)


def test_grad_flows_through_ops_before_hidden():
    torch.manual_seed(1)
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    proj = torch.nn.Linear(HIDDEN, HIDDEN)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels[:, 5:] = -100
    reference(torch.tanh(proj(x)), head, labels).backward()
    want = [x.grad.clone(), proj.weight.grad.clone(), head.weight.grad.clone()]
    x.grad = None
    proj.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    loss, _ = chunked_lm_loss(torch.tanh(proj(x)), head, labels, chunk_tokens=2)
    loss.backward()
    assert_grads_close([x.grad, proj.weight.grad, head.weight.grad], want)


def test_no_grad_path_matches():
    hidden, head, labels = make_case(bias=True)
    with torch.no_grad():
        ref = reference(hidden, head, labels)
        loss, n = chunked_lm_loss(hidden, head, labels, chunk_tokens=3)
    assert n == n_trained(labels) and not loss.requires_grad
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # grad enabled but nothing requires grad: same plain path
    head.requires_grad_(False)
    loss2, _ = chunked_lm_loss(hidden.detach(), head, labels, chunk_tokens=3)
    assert not loss2.requires_grad
    torch.testing.assert_close(loss2, ref, atol=1e-5, rtol=1e-5)


def test_no_trained_tokens_gives_zero_loss():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    head = torch.nn.Linear(8, 10)
    loss, n = chunked_lm_loss(hidden, head, torch.full((1, 4), -100))
    assert n == 0 and float(loss.detach()) == 0.0
    loss.backward()  # still connected to the graph
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    # only the last position trained: it predicts nothing
    labels = torch.full((1, 4), -100)
    labels[0, 0] = 3
    loss, n = chunked_lm_loss(hidden, head, labels)
    assert n == 0 and float(loss.detach()) == 0.0


def test_bad_chunk_size():
    hidden, head, labels = make_case()
    with pytest.raises(ValueError):
        chunked_lm_loss(hidden, head, labels, chunk_tokens=0)


@pytest.mark.parametrize("bias", [False, True])
def test_autocast_bf16_close_to_fp32_with_input_dtypes(bias):
    hidden, head, labels = make_case(bias)
    ref = reference(hidden, head, labels)
    ref.backward()
    want = grads(hidden, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n = chunked_lm_loss(hidden, head, labels, chunk_tokens=3)
        # what autocast itself does on the unfused path
        amp_ref = reference(hidden, head, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=0.05 * n, rtol=2e-2)
    torch.testing.assert_close(loss, amp_ref, atol=1e-3, rtol=1e-4)
    loss.backward()
    got = grads(hidden, head)
    assert got[0].dtype == hidden.dtype and got[1].dtype == head.weight.dtype
    if bias:
        assert got[2].dtype == head.bias.dtype
    for g, w in zip(got, want, strict=True):
        if w is not None:
            torch.testing.assert_close(g, w, atol=3e-2, rtol=3e-2)


def test_bf16_inputs_without_autocast():
    hidden, head, labels = make_case()
    hidden = hidden.detach().bfloat16().requires_grad_()
    head = head.bfloat16()
    h32 = hidden.detach().float().requires_grad_()
    w32 = head.weight.detach().float().requires_grad_()
    ref = reference(h32, lambda h: F.linear(h, w32), labels)
    ref.backward()
    loss, _ = chunked_lm_loss(hidden, head, labels, chunk_tokens=3)
    loss.backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, atol=0.5, rtol=2e-2)
    torch.testing.assert_close(hidden.grad.float(), h32.grad, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(head.weight.grad.float(), w32.grad, atol=3e-2, rtol=3e-2)


def test_tied_head_accumulates_both_grads():
    torch.manual_seed(2)
    emb = torch.nn.Embedding(VOCAB, HIDDEN)
    mix = torch.nn.Linear(HIDDEN, HIDDEN)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    head.weight = emb.weight
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = ids.clone()
    labels[0, :3] = -100

    def run(loss_fn):
        emb.zero_grad(set_to_none=True)
        mix.zero_grad(set_to_none=True)
        loss = loss_fn(torch.tanh(mix(emb(ids))))
        loss.backward()
        return loss.detach(), emb.weight.grad.clone(), mix.weight.grad.clone()

    ref, g_emb, g_mix = run(lambda h: reference(h, head, labels))
    loss, c_emb, c_mix = run(lambda h: chunked_lm_loss(h, head, labels, chunk_tokens=4)[0])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_emb, g_emb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(c_mix, g_mix, atol=1e-5, rtol=1e-4)
    # the embedding grad really holds both parts: head-only grad differs from the total
    emb.zero_grad(set_to_none=True)
    chunked_lm_loss(torch.tanh(mix(emb(ids))).detach(), head, labels, chunk_tokens=4)[0].backward()
    assert not torch.allclose(emb.weight.grad, c_emb)


def test_backward_does_not_recompute_the_head():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                       torch.ops.aten.linear, torch.ops.aten.matmul):
                self.n += 1
            return func(*args, **(kwargs or {}))

    hidden, head, labels = make_case(bias=True)
    loss, _ = chunked_lm_loss(hidden, head, labels, chunk_tokens=3)
    with CountMatmuls() as counter:
        loss.backward()
    assert counter.n == 0
    assert hidden.grad is not None and head.weight.grad is not None


def test_bf16_grads_are_scaled_in_fp32():
    hidden, head, labels = make_case()
    hidden = hidden.detach().bfloat16().requires_grad_()
    head = head.bfloat16()
    chunked_lm_loss(hidden, head, labels, chunk_tokens=3)[0].backward()
    g_h, g_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    scale = torch.tensor(1 / 2999)
    (chunked_lm_loss(hidden, head, labels, chunk_tokens=3)[0] * scale).backward()
    # the scale is not rounded to bf16 before it is applied
    torch.testing.assert_close(hidden.grad, (g_h.float() * scale).bfloat16(), atol=0, rtol=0)
    torch.testing.assert_close(head.weight.grad.float(), g_w.float() * scale, atol=0, rtol=1e-2)


@pytest.mark.parametrize("transform", [LogitTransform(scale=0.25), LogitTransform(softcap=2.0),
                                       LogitTransform(scale=3.0, softcap=1.5)], ids=["scale", "softcap", "both"])
@pytest.mark.parametrize("chunk_tokens", [4, 1024])
def test_the_models_logit_transform_in_loss_and_grads(transform, chunk_tokens):
    hidden, head, labels = make_case(bias=True)
    logits = head(hidden).float() * transform.scale
    if transform.softcap is not None:
        logits = torch.tanh(logits / transform.softcap) * transform.softcap
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    want = grads(hidden, head)

    loss, _ = chunked_lm_loss(hidden, head, labels, chunk_tokens=chunk_tokens, transform=transform)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(hidden, head), want)
    with torch.no_grad():
        plain, _ = chunked_lm_loss(hidden, head, labels, chunk_tokens=chunk_tokens, transform=transform)
    torch.testing.assert_close(plain, ref.detach(), atol=1e-5, rtol=1e-5)


def test_logit_transform_is_read_from_the_models_forward():
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    small = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2}
    assert logit_transform(CohereForCausalLM(CohereConfig(logit_scale=0.5, **small))) == LogitTransform(0.5)
    assert logit_transform(GraniteForCausalLM(GraniteConfig(logits_scaling=4.0, **small))) == LogitTransform(0.25)

    class Squared(LlamaForCausalLM):
        def forward(self, input_ids):
            logits = self.lm_head(self.model(input_ids).last_hidden_state)
            logits = logits**2
            return logits

    with pytest.raises(ModelError, match=r"transforms its output logits \(logits = logits\*\*2\)"):
        logit_transform(Squared(LlamaConfig(**small)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the fp32-accumulating bf16 GEMM)")
def test_trained_head_gradient_in_bf16_matches_full_cross_entropy_on_gpu():
    """bf16 compute on a GPU: the head's gradient accumulates chunk by chunk in fp32 inside the GEMM."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 64, 128, device="cuda", requires_grad=True)
    head = torch.nn.Linear(128, 1000, bias=False).cuda()
    labels = torch.randint(0, 1000, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = reference(hidden, head, labels)
    ref.backward()
    want = head.weight.grad.clone()
    head.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = chunked_lm_loss(hidden, head, labels, chunk_tokens=32)
    loss.backward()
    assert head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(head.weight.grad, want, rtol=2e-2, atol=2e-2)
