import pytest
import torch

from tuneforge.data.conversation import Message
from tuneforge.models.generate import (
    Decoding,
    RowSampler,
    encode_prompts,
    generate,
    generate_rows,
    left_pad,
    render_chat,
    stop_token_ids,
    supports_tools,
)

CHATS = [
    [Message("user", "Hello world")],
    [Message("user", "Upper-case the word: apple")],
    [Message("system", "Be brief."), Message("user", "What is 2 + 3? The answer is")],
    [Message("user", "Classify the sentiment: I love it")],
]


def test_render_chat_adds_generation_prompt_and_system(tiny_tokenizer):
    text = render_chat(tiny_tokenizer, CHATS[0], system_prompt="Sys.")
    assert text == "<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    # an explicit system turn wins over system_prompt
    assert "Sys." not in render_chat(tiny_tokenizer, CHATS[2], system_prompt="Sys.")


def test_tokenizer_without_template_falls_back_to_chatml(tiny_tokenizer):
    expected = render_chat(tiny_tokenizer, CHATS[0])  # the fixture's template is ChatML
    tiny_tokenizer.chat_template = None
    assert render_chat(tiny_tokenizer, CHATS[0]) == expected


def test_plain_strings_are_not_templated(tiny_tokenizer):
    ids = encode_prompts(tiny_tokenizer, ["Hello world"])[0]
    assert tiny_tokenizer.decode(ids) == "Hello world"


def test_stop_tokens_include_end_of_turn(tiny_tokenizer, smollm_tokenizer):
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tiny_tokenizer)
    assert smollm_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(smollm_tokenizer)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generate_returns_stripped_strings(tiny_model, tiny_tokenizer):
    outs = generate(tiny_model, tiny_tokenizer, CHATS, max_new_tokens=8)
    assert len(outs) == len(CHATS)
    assert all(isinstance(o, str) and o == o.strip() for o in outs)
    assert not any("<|im_end|>" in o or "<|endoftext|>" in o for o in outs)


def test_batched_equals_unbatched_greedy(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: varied continuations instead of repeats of "\n"
        for p in tiny_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    batched = generate(tiny_model, tiny_tokenizer, CHATS, max_new_tokens=12, batch_size=4)
    single = generate(tiny_model, tiny_tokenizer, CHATS, max_new_tokens=12, batch_size=1)
    assert batched == single
    assert len(set(batched)) > 1  # distinct prompts give distinct continuations: a real check


def test_stops_at_end_of_turn(tiny_model, tiny_tokenizer):
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    bias = torch.zeros(len(tiny_tokenizer))
    bias[eot] = 1e4  # make <|im_end|> the greedy choice after any input
    tiny_model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    assert generate(tiny_model, tiny_tokenizer, CHATS[:2], max_new_tokens=8) == ["", ""]


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_model, tiny_tokenizer):
    prompts = ["Hello", "The quick"]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=10, temperature=1.0, seed=1)
    assert torch.rand(1) == before
    b = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=10, temperature=1.0, seed=1)
    c = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=10, temperature=1.0, seed=2)
    assert a == b
    assert a != c


def test_restores_training_mode(tiny_model, tiny_tokenizer):
    tiny_model.train()
    generate(tiny_model, tiny_tokenizer, ["Hello"], max_new_tokens=2)
    assert tiny_model.training


def step(rows, scores, generated, constraints=None):
    """One RowSampler step over fake scores; ``generated``: the tokens each row produced so far."""
    sampler = RowSampler(rows, prompt_width=1, constraints=constraints)
    ids = torch.tensor([[0] + g for g in generated])
    out = sampler(ids, scores.clone())
    return sampler, out


def test_row_sampler_applies_bias_penalties_and_reports_logprobs():
    scores = torch.tensor([[0.0, 1.0, 2.0, 0.5, -1.0]] * 3)
    rows = [Decoding(top_logprobs=2),
            Decoding(logit_bias={0: 5.0}, top_logprobs=0),
            Decoding(frequency_penalty=0.5, presence_penalty=1.0, top_logprobs=5)]
    sampler, out = step(rows, scores, [[2, 2], [2, 2], [2, 2]])
    assert [int(r.argmax()) for r in out] == [2, 0, 1]
    assert torch.isinf(out).sum(1).tolist() == [4, 4, 4]  # one finite score per row: HF's greedy takes it
    expected = torch.log_softmax(scores[0], -1)
    assert sampler.last[0].token == 2 and abs(sampler.last[0].logprob - expected[2].item()) < 1e-6
    assert [t for t, _ in sampler.last[0].top] == [2, 1]
    assert sampler.last[1].top == [] and abs(sampler.last[1].logprob - torch.log_softmax(
        scores[0] + torch.tensor([5.0, 0, 0, 0, 0]), -1)[0].item()) < 1e-6
    adjusted = scores[0] - torch.tensor([0, 0, 0.5 * 2 + 1.0, 0, 0])  # token 2 seen twice
    assert [round(lp, 5) for _, lp in sampler.last[2].top] == [
        round(v, 5) for v in torch.log_softmax(adjusted, -1).sort(descending=True).values.tolist()]


def test_row_sampler_seeds_each_row_and_top_p_keeps_the_nucleus():
    scores = torch.zeros(4, 50)
    scores[:, 7] = 3.0  # token 7 holds most of the mass: top_p 0.1 keeps only it
    rows = [Decoding(temperature=1.0, seed=5), Decoding(temperature=1.0, seed=5), Decoding(temperature=1.0, seed=6),
            Decoding(temperature=1.0, top_p=0.1, seed=5)]
    picks = [[int(r.argmax()) for r in step(rows, scores, [[]] * 4)[1]] for _ in range(20)]
    assert all(p[0] == p[1] for p in picks)  # the same seed in two rows of one batch: the same draws
    assert any(p[0] != p[2] for p in picks)  # another seed: other draws
    assert all(p[3] == 7 for p in picks)


class OnlyEven:
    """A constraint allowing even token ids; records what it was given."""

    def __init__(self):
        self.seen = []

    def allowed(self, vocab_size):
        return torch.arange(vocab_size) % 2 == 0

    def advance(self, token):
        self.seen.append(token)


def test_row_sampler_follows_the_constraint_and_skips_finished_rows():
    scores = torch.tensor([[0.0, 9.0, 1.0, 8.0]] * 2)
    c = OnlyEven()
    sampler = RowSampler([Decoding(top_logprobs=1), Decoding()], prompt_width=1, constraints=[c, None])
    out = sampler(torch.tensor([[0], [0]]), scores.clone())
    assert [int(r.argmax()) for r in out] == [2, 1] and c.seen == [2]
    # the mask renormalizes over the even tokens 0 and 2
    assert abs(sampler.last[0].logprob - torch.log_softmax(torch.tensor([0.0, 1.0]), -1)[1].item()) < 1e-6
    sampler.finished.add(0)
    sampler(torch.tensor([[0, 2], [0, 1]]), scores.clone())
    assert c.seen == [2]  # a finished row's constraint is not advanced


def test_supports_tools_reads_the_template(tiny_tokenizer):
    assert not supports_tools(tiny_tokenizer)  # ChatML without a tools block
    tiny_tokenizer.chat_template = ("{% for t in tools %}{{ t.function.name }}{% endfor %}"
                                    "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert supports_tools(tiny_tokenizer)


def test_plain_greedy_rows_pass_the_scores_through():
    scores = torch.randn(2, 9)
    sampler = RowSampler([Decoding(seed=3), Decoding(top_p=0.5)], prompt_width=1)
    assert sampler(torch.tensor([[0], [0]]), scores) is scores  # top_p does nothing at temperature 0
    assert not RowSampler([Decoding(), Decoding(presence_penalty=0.5)], prompt_width=1).plain


class Recorder(RowSampler):
    """A RowSampler that keeps the scores Hugging Face hands it."""

    seen: list[torch.Tensor]

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return super().__call__(input_ids, scores)


def test_the_models_generation_config_leaves_the_scores_alone(tiny_model, tiny_tokenizer):
    ids, mask = left_pad(encode_prompts(tiny_tokenizer, [CHATS[0]]), pad_id=0)
    with torch.no_grad():
        raw = tiny_model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    # a checkpoint's defaults that would rewrite the scores before the sampler sees them
    tiny_model.generation_config.repetition_penalty = 2.0
    tiny_model.generation_config.suppress_tokens = [int(raw.argmax())]
    tiny_model.generation_config.min_new_tokens = 3
    sampler = Recorder([Decoding(top_logprobs=2)], ids.shape[1])
    sampler.seen = []
    with torch.no_grad():
        generate_rows(tiny_model, ids, mask, sampler, 1, stop_token_ids(tiny_tokenizer), 0)
    assert torch.allclose(sampler.seen[0], raw, atol=1e-4)
    assert sampler.last[0].logprob == pytest.approx(torch.log_softmax(raw[0], -1).max().item(), abs=1e-4)
    assert tiny_model.generation_config.repetition_penalty == 2.0  # the model's own config is back


def test_a_failing_grammar_ends_only_its_row():
    class Refuses:
        def allowed(self, vocab_size):
            return torch.ones(vocab_size, dtype=torch.bool)

        def advance(self, token):
            raise RuntimeError(f"the grammar refused token {token}")

    scores = torch.tensor([[0.0, 9.0, 1.0]] * 3)
    sampler = RowSampler([Decoding(), Decoding(), Decoding(logit_bias={1: -100.0})], prompt_width=1,
                         constraints=[None, Refuses(), None])
    out = sampler(torch.tensor([[0], [0], [0]]), scores.clone())
    assert [int(r.argmax()) for r in out] == [1, 1, 2]
    assert sampler.failed == {1: "the grammar refused token 1"} and sampler.finished == {1}
