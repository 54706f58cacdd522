"""Generation fixes (issue #12 items 1, 6, 8, 10; #13.11): job fingerprints, process counts, beams, RNG, JSONL."""

import json
import os
import shutil

import pytest
import torch

from alignkit.config import ConfigError, ModelConfig
from alignkit.data.chat import tokenize_prompt
from alignkit.generation import GenerateConfig, PromptSource, SamplingParams, generate, read_jsonl, run_generate

from .test_generation import PROMPTS, load


def gen_cfg(out, model_dir, data_dir, **kw) -> GenerateConfig:
    base = dict(output_dir=str(out), model=ModelConfig(name_or_path=str(model_dir)),
                prompts=PromptSource(dataset=str(data_dir), split="test", max_prompts=6),
                sampling=SamplingParams(max_new_tokens=4), batch_size=4, quiet=True)
    base.update(kw)
    return GenerateConfig(**base)


def test_rerun_with_a_different_job_stops_or_starts_afresh(tmp_path, tiny_model_dir, toy_data_dir):
    """#12.1: a rerun in the same folder resumes only the same job; a changed one stops, naming the change."""
    out = tmp_path / "gen"
    first = read_jsonl(run_generate(gen_cfg(out, tiny_model_dir, toy_data_dir)))
    config_before = (out / "config.yaml").read_text()
    assert (out / "job.json").is_file()
    assert read_jsonl(run_generate(gen_cfg(out, tiny_model_dir, toy_data_dir))) == first  # same job: reused
    with pytest.raises(ConfigError, match="sampling.max_new_tokens: 4 -> 6"):
        run_generate(gen_cfg(out, tiny_model_dir, toy_data_dir, sampling=SamplingParams(max_new_tokens=6)))
    with pytest.raises(ConfigError, match="prompts.max_prompts: 6 -> 3"):
        run_generate(gen_cfg(out, tiny_model_dir, toy_data_dir, prompts=PromptSource(dataset=str(toy_data_dir), split="test", max_prompts=3)))
    assert (out / "config.yaml").read_text() == config_before  # the refused runs wrote nothing
    # Another model folder is a different job; overwrite starts afresh.
    weights = next(tiny_model_dir.glob("*.safetensors"))
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    with pytest.raises(ConfigError, match="model.path"):
        run_generate(gen_cfg(out, copy, toy_data_dir))
    again = run_generate(gen_cfg(out, copy, toy_data_dir, sampling=SamplingParams(max_new_tokens=6), overwrite=True))
    rows = read_jsonl(again)
    assert [r["id"] for r in rows] == list(range(6)) and all(r["params"]["max_new_tokens"] == 6 for r in rows)
    assert all(r["model"] == str(copy) for r in rows)
    assert "max_new_tokens: 6" in (out / "config.yaml").read_text()
    job = json.loads((out / "job.json").read_text())
    os.utime(copy / weights.name, ns=(1, 1))  # retrained in place: same path, new weights file
    with pytest.raises(ConfigError, match="model.weights"):
        run_generate(gen_cfg(out, copy, toy_data_dir, sampling=SamplingParams(max_new_tokens=6)))
    assert json.loads((out / "job.json").read_text()) == job


class FakeState:
    """One process of a multi-process run, played in turn by a single test process."""

    def __init__(self, index: int, count: int):
        self.process_index, self.num_processes = index, count
        self.is_main_process, self.device = index == 0, torch.device("cpu")

    def wait_for_everyone(self):
        pass


def test_resume_with_another_process_count_does_not_duplicate(tmp_path, monkeypatch, tiny_model_dir, toy_data_dir):
    """#12.6: 2 processes then 3 in one folder give each prompt once (66 rows for 40 prompts before)."""
    import alignkit.train.loop as loop

    cfg = gen_cfg(tmp_path / "gen", tiny_model_dir, toy_data_dir, prompts=PromptSource(dataset=str(toy_data_dir), split="test", max_prompts=12))
    for count in (2, 3, 1):
        for index in range(count):  # played in turn: the main process first, as it writes job.json first
            monkeypatch.setattr(loop, "distributed_state", lambda: FakeState(index, count))
            path = run_generate(cfg)
    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == list(range(12))
    # Interrupted mid-run under 3 processes (rank 2's rows lost), resumed by one: still once each.
    rows = read_jsonl(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] % 3 != 2))
    (tmp_path / "gen" / "responses.rank1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] in (5, 8)))
    monkeypatch.setattr(loop, "distributed_state", lambda: FakeState(0, 1))
    again = read_jsonl(run_generate(cfg))
    assert [r["id"] for r in again] == list(range(12)) and [r["response"] for r in again] == [r["response"] for r in rows]
    assert sorted(p.name for p in (tmp_path / "gen").glob("responses*.jsonl")) == ["responses.jsonl"]


def sequence_logprob(model, chat, prompt, completion) -> float:
    ids = tokenize_prompt(chat.tokenizer, prompt)
    new = completion.token_ids + ([chat.end_of_turn_id] if completion.finish_reason == "stop" else [])
    with torch.no_grad():
        logps = model(torch.tensor([ids + new])).logits[0].float().log_softmax(-1)
    return sum(logps[len(ids) - 1 + k, t].item() for k, t in enumerate(new))


def test_beam_search_is_not_worse_than_greedy(trained_toy_model, toy_data_dir):
    """#12.8: beam search runs to the end ("never"; True stopped once 3 beams finished, below greedy
    on 11 of 96 prompts of one toy model). Beam search is not exact (greedy's path can leave a 3-wide
    beam), so a few prompts may still fall below greedy: 0 of 96 on that model, 3 of 32 here."""
    import alignkit.generation as gen

    model, chat = load(trained_toy_model)
    prompts = [r["messages"][:1] for r in read_jsonl(toy_data_dir / "test.jsonl")]
    greedy = generate(model, chat, prompts, SamplingParams(max_new_tokens=32))
    beam = SamplingParams(max_new_tokens=32, num_beams=3, length_penalty=1.0)
    assert gen.decoding_config(beam, [0], 0).early_stopping == "never"

    def score(p, c):  # what beam search ranks by at length_penalty 1: sum of log-probs / length
        return sequence_logprob(model, chat, p, c) / (len(c.token_ids) + (c.finish_reason == "stop"))

    def worse(beams):
        return [k for k, (p, b, g) in enumerate(zip(prompts, beams, greedy)) if score(p, b[0]) < score(p, g[0]) - 1e-4]

    canonical = worse(generate(model, chat, prompts, beam))
    assert len(canonical) <= len(prompts) // 8, canonical  # measured: 3 of 32 on this fixture


def test_generate_leaves_the_global_rng_alone_and_seeds_per_prompt(trained_toy_model):
    """#12.10: generate() does not reseed the global RNG; a prompt's samples do not depend on its batch."""
    model, chat = load(trained_toy_model)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    generate(model, chat, PROMPTS, SamplingParams(max_new_tokens=8))
    assert torch.equal(torch.get_rng_state(), before)
    params = SamplingParams(max_new_tokens=12, temperature=1.5, n=3, seed=7)
    together = generate(model, chat, PROMPTS, params, batch_size=4)
    assert torch.equal(torch.get_rng_state(), before)
    for k, prompt in enumerate(PROMPTS):
        alone = generate(model, chat, [prompt], params)
        assert [c.text for c in alone[0]] == [c.text for c in together[k]], k
    assert len({c.text for o in together for c in o}) > 3  # really sampled


def test_read_jsonl_splits_on_newlines_only(tmp_path):
    """#13.11: U+2028, U+2029 and U+0085 inside JSON strings do not split rows."""
    rows = [{"response": "a\u2028b"}, {"response": "c\u0085d"}, {"response": "e\u2029f\x1cg"}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_jsonl(path) == rows


def test_seeded_sampler_in_place_noise_equals_the_out_of_place_formula():
    """#23: SeededSampler draws into a reused buffer and computes the Gumbel noise in place; its output
    equals the out-of-place definition bit for bit (fp32 and bf16 scores, greedy rows, several steps),
    and the returned scores do not alias the buffer that the next step overwrites."""
    from alignkit.generation import SeededSampler

    def reference(seeds, steps, noisy):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = []
        for scores in steps:
            u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in gens])
            gumbel = -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))
            if noisy is not None:
                gumbel = gumbel * torch.tensor(noisy, dtype=torch.float32).unsqueeze(-1)
            out.append(scores.float() + gumbel)
        return out

    seeds = [3, 1, 4, 1, 5]
    for noisy in (None, [True, False, True, True, False]):
        for dtype in (torch.float32, torch.bfloat16):
            steps = [torch.randn(5, 1000, generator=torch.Generator().manual_seed(k)).to(dtype) for k in range(3)]
            sampler = SeededSampler(seeds, torch.device("cpu"), noisy)
            got = [sampler(None, s.clone()) for s in steps]
            for a, b in zip(got, reference(seeds, steps, noisy)):
                assert a.dtype == torch.float32 and torch.equal(a, b)
            assert got[0].data_ptr() != sampler.buffer.data_ptr()
