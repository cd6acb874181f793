import torch

from tuneforge.data.conversation import Message
from tuneforge.models.generate import encode_prompts, generate, left_pad, render_chat, stop_token_ids

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
