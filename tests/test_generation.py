"""Generation: stops at end-of-turn, seeded sampling, beam search, resumable stage."""

import json

import pytest

from alignkit.config import ModelConfig
from alignkit.generation import GenerateConfig, PromptSource, SamplingParams, generate, read_jsonl, run_generate
from alignkit.models import load_causal_lm, load_tokenizer


def load(model_dir):
    chat = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    return load_causal_lm(ModelConfig(name_or_path=str(model_dir)), chat), chat


PROMPTS = [[{"role": "user", "content": p}] for p in ["What is 2 plus 5?", "Write frog in capital letters.", "Sort these numbers: 3 1 2", "Repeat the word cat 3 times."]]


def test_stops_at_end_of_turn(trained_toy_model):
    model, chat = load(trained_toy_model)
    outs = generate(model, chat, PROMPTS, SamplingParams(max_new_tokens=40), batch_size=3)
    assert [len(o) for o in outs] == [1, 1, 1, 1]
    assert all(o[0].finish_reason == "stop" and len(o[0].token_ids) < 40 for o in outs)
    assert all(chat.end_of_turn_id not in o[0].token_ids for o in outs)  # the stop token is not part of the text


def test_sampling_is_reproducible_with_a_seed(trained_toy_model):
    model, chat = load(trained_toy_model)
    params = SamplingParams(max_new_tokens=12, temperature=1.5, n=3, seed=7)
    a = generate(model, chat, PROMPTS, params)
    b = generate(model, chat, PROMPTS, params)
    assert [[c.text for c in o] for o in a] == [[c.text for c in o] for o in b]
    assert all(len(o) == 3 for o in a)
    c = generate(model, chat, PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.5, n=3, seed=8))
    assert [[x.text for x in o] for o in a] != [[x.text for x in o] for o in c]


def test_beam_search_runs(trained_toy_model):
    model, chat = load(trained_toy_model)
    outs = generate(model, chat, PROMPTS[:2], SamplingParams(max_new_tokens=12, num_beams=3, n=2, length_penalty=0.5))
    assert [len(o) for o in outs] == [2, 2]
    with pytest.raises(ValueError, match="n > 1 needs sampling"):
        generate(model, chat, PROMPTS[:1], SamplingParams(n=2))


def test_generate_stage_writes_jsonl_and_resumes(tmp_path, trained_toy_model, toy_data_dir):
    cfg = GenerateConfig(output_dir=str(tmp_path / "gen"), model=ModelConfig(name_or_path=str(trained_toy_model)),
                         prompts=PromptSource(dataset=str(toy_data_dir), split="test", max_prompts=12),
                         sampling=SamplingParams(max_new_tokens=24), batch_size=4, quiet=True)
    path = run_generate(cfg)
    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == list(range(12))
    assert set(rows[0]) == {"id", "sample", "prompt", "response", "n_tokens", "finish_reason", "category", "model", "params"}
    assert rows[0]["prompt"][-1]["role"] == "user" and rows[0]["params"]["max_new_tokens"] == 24
    # Interrupted: the last rows are lost and one line is torn mid-write. A rerun completes it.
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:7]) + "\n" + lines[7][:15])
    again_lines = run_generate(cfg).read_text().splitlines()
    assert again_lines[:7] == lines[:7]  # kept, not regenerated
    again = [json.loads(line) for line in again_lines]
    assert [r["id"] for r in again] == list(range(12))  # the torn row and the lost ones, once each
    assert {r["id"]: r["response"] for r in again} == {r["id"]: r["response"] for r in rows}


def test_checkpoint_generation_config_does_not_change_decoding(tmp_path, trained_toy_model):
    """Only SamplingParams decide decoding: a checkpoint's own defaults (here extreme ones) are ignored."""
    import shutil

    from transformers import GenerationConfig

    model, chat = load(trained_toy_model)
    greedy = generate(model, chat, PROMPTS, SamplingParams(max_new_tokens=24))
    sampled = generate(model, chat, PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.5, n=4, seed=3))
    odd = tmp_path / "odd"
    shutil.copytree(trained_toy_model, odd)
    GenerationConfig(do_sample=True, temperature=0.1, repetition_penalty=20.0, top_k=1, no_repeat_ngram_size=1, eos_token_id=chat.stop_ids()).save_pretrained(odd)
    odd_model, _ = load(odd)
    assert odd_model.generation_config.repetition_penalty == 20.0
    assert [[c.text for c in o] for o in generate(odd_model, chat, PROMPTS, SamplingParams(max_new_tokens=24))] == [[c.text for c in o] for o in greedy]
    again = generate(odd_model, chat, PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.5, n=4, seed=3))
    assert [[c.text for c in o] for o in again] == [[c.text for c in o] for o in sampled]
    assert any(len({c.text for c in o}) > 1 for o in again)  # top_k=1 would have made the 4 samples equal
    assert odd_model.generation_config.repetition_penalty == 20.0  # restored afterwards
    # Asked for explicitly, the knobs do act.
    penalised = generate(model, chat, PROMPTS, SamplingParams(max_new_tokens=24, repetition_penalty=20.0))
    assert [o[0].text for o in penalised] != [o[0].text for o in greedy]
