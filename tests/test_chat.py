"""Label masks: exactly the reply tokens and their end-of-turn token are trained on."""


from alignkit.config import ModelConfig
from alignkit.data.chat import IGNORE_INDEX, CHATML_TEMPLATE, render, tokenize_chat, tokenize_prompt
from alignkit.data.schema import first_turn
from alignkit.models import load_tokenizer

from .conftest import need_shared, read_jsonl


def labelled_runs(tok, ids, labels):
    """Decoded text of each maximal run of labelled positions."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def check_masks(chat, messages):
    tok = chat.tokenizer
    t = tokenize_chat(tok, messages, chat.end_of_turn)
    # The pieces add up to exactly the template's rendering of the whole chat.
    assert tok.decode(t.input_ids) == render(tok, messages)
    replies = [m["content"] + chat.end_of_turn for m in messages if m["role"] == "assistant"]
    assert labelled_runs(tok, t.input_ids, t.labels) == replies
    # Everything else (system, user, role headers, newlines) is masked.
    masked_text = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab == IGNORE_INDEX])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in masked_text
    # The prompt part is exactly what generation sees for the first reply.
    first_reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    assert t.input_ids[: t.prompt_tokens] == tokenize_prompt(tok, messages[:first_reply])
    return t


def test_masks_toy_multi_turn(toy_chat):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write cat in capital letters."},
        {"role": "assistant", "content": "CAT"},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
    ]
    t = check_masks(toy_chat, msgs)
    eot = toy_chat.end_of_turn_id
    assert sum(1 for i, lab in zip(t.input_ids, t.labels) if i == eot and lab == eot) == 2
    assert t.response_tokens == [len(toy_chat.tokenizer("CAT<|im_end|>", add_special_tokens=False)["input_ids"]), 2]


def test_masks_real_qwen_multi_turn_chats(qwen_chat):
    rows = read_jsonl(need_shared("data", "smoltalk_like", "train.jsonl"))
    multi = [r["messages"] for r in rows if len(r["messages"]) == 4][:25]
    single = [r["messages"] for r in rows if len(r["messages"]) == 2][:25]
    assert qwen_chat.end_of_turn == "<|im_end|>"
    for messages in multi + single:
        t = check_masks(qwen_chat, messages)
        # Qwen's template injects a default system prompt: it must be masked.
        sys_ids = qwen_chat.tokenizer("You are a helpful assistant.", add_special_tokens=False)["input_ids"]
        start = t.input_ids.index(sys_ids[0])
        assert all(lab == IGNORE_INDEX for lab in t.labels[start : start + len(sys_ids)])
        # No <|endoftext|> anywhere; every <|im_end|> after a reply is labelled, the others are not.
        im_end = qwen_chat.end_of_turn_id
        labelled_ends = sum(1 for i, lab in zip(t.input_ids, t.labels) if i == im_end and lab != IGNORE_INDEX)
        assert labelled_ends == sum(m["role"] == "assistant" for m in messages)


def test_first_turn_only():
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert first_turn(msgs) == msgs[:3]


def test_response_truncation_drops_end_of_turn_and_later_turns(toy_chat):
    msgs = [
        {"role": "user", "content": "Repeat the word cat 4 times."},
        {"role": "assistant", "content": "cat cat cat cat"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "cat"},
    ]
    t = tokenize_chat(toy_chat.tokenizer, msgs, toy_chat.end_of_turn, max_response_tokens=3)
    assert t.truncated and t.response_tokens == [3]
    assert len(t.input_ids) == t.prompt_tokens + 3
    assert toy_chat.end_of_turn_id not in t.input_ids[t.prompt_tokens :]


def test_tokenizer_without_template_gets_chatml(tmp_path, toy_tokenizer_dir):
    from alignkit.demo.world import build_tokenizer

    bare = build_tokenizer(tmp_path / "bare", with_template=False)
    chat = load_tokenizer(ModelConfig(name_or_path=str(bare)))
    assert chat.tokenizer.chat_template == CHATML_TEMPLATE
    assert chat.end_of_turn == "<|im_end|>"
    custom = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|endoftext|>{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    chat = load_tokenizer(ModelConfig(name_or_path=str(bare), chat_template=custom))
    assert chat.end_of_turn == "<|endoftext|>"
    check_masks(chat, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "CAT"}])


def test_base_model_stops_on_end_of_turn_and_eos(qwen_chat):
    tok = qwen_chat.tokenizer
    assert tok.eos_token == "<|endoftext|>"  # the base model's EOS differs from the template's end of turn
    assert qwen_chat.stop_ids() == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
