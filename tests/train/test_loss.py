import torch
import torch.nn.functional as F

from tuneforge.train.loss import chunked_lm_loss


def reference(hidden, head, labels):
    logits = head(hidden).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def test_chunked_loss_and_grads_match_full_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    labels[1, 7] = -100
    ref = reference(hidden, head, labels)
    ref.backward()
    g_h, g_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    loss, n = chunked_lm_loss(hidden, head, labels, chunk_tokens=3)
    loss.backward()
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad, g_h)
    torch.testing.assert_close(head.weight.grad, g_w)


def test_no_trained_tokens_gives_zero_loss():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    head = torch.nn.Linear(8, 10)
    loss, n = chunked_lm_loss(hidden, head, torch.full((1, 4), -100))
    assert n == 0 and float(loss.detach()) == 0.0
