"""#8 "Rewards that need the data": verifiers receive the prompt row's columns by name."""

import pytest

from alignkit.config import ConfigError
from alignkit.rewards.backends import CachedReward, RewardConfig, RuleReward, build_backend
from alignkit.rewards.verifiers import countdown_reward


def user(text):
    return [{"role": "user", "content": text}]


def test_countdown_reads_nums_and_target_from_the_row_whatever_the_wording():
    """Another wording of the same task scored 0 when the verifier parsed the prompt."""
    prompt = "Make 24 out of 3, 8 and 1; put your equation between answer tags."  # no 'numbers [...] equals N'
    response = "<answer>(3 * 8) * 1</answer>"
    assert countdown_reward(prompt, response) == 0.0
    assert countdown_reward(prompt, response, nums=[3, 8, 1], target=24) == 1.0
    assert countdown_reward(prompt, "<answer>3 * 8 + 1</answer>", nums=[3, 8, 1], target=24) == 0.1
    # The text-only form still works.
    assert countdown_reward("Using the numbers [3, 8, 1], create an equation that equals 24.", response) == 1.0


def test_countdown_tolerance():
    """Exact by default; tolerance 1e-5 accepts what the course's grader accepts, and no more."""
    nums, target = [1, 3], 0
    near = "<answer>1 / 3 - 1 / 3</answer>"  # exactly 0 but uses 1 and 3 twice: wrong numbers either way
    assert countdown_reward("", near, nums=nums, target=target, tolerance=1e-5) == 0.1
    assert countdown_reward("", "<answer>3 / 7</answer>", nums=[3, 7], target=0) == 0.1  # 0.43 is not 0
    assert countdown_reward("", "<answer>3 / 7</answer>", nums=[3, 7], target=0, tolerance=0.5) == 1.0


def test_rule_backend_passes_columns_and_tolerance():
    backend = build_backend(RewardConfig(kind="rule", rule="countdown", tolerance=0.5), None)
    prompts = [user("Solve it."), user("Solve it.")]
    scores = backend.score(prompts, ["<answer>3 / 7</answer>", "<answer>3 / 7</answer>"], [{"nums": [3, 7], "target": 0}, {"nums": [3, 7], "target": 5}])
    assert scores == [1.0, 0.1]
    with pytest.raises(ConfigError, match="takes no tolerance"):
        build_backend(RewardConfig(kind="rule", rule="toy", tolerance=0.5), None)


def needs_answer(prompt, response, answer):
    return float(response.strip() == str(answer))


def test_rows_without_the_columns_a_verifier_needs_are_refused_naming_row_and_column(monkeypatch):
    import alignkit.rewards.verifiers as v

    monkeypatch.setitem(v.VERIFIERS, "needs_answer", needs_answer)
    backend = RuleReward("needs_answer")
    prompts = [user("a"), user("b")]
    assert backend.score(prompts, ["4", "5"], [{"answer": 4}, {"answer": 4}]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"prompts.jsonl, line 2: .*needs column\(s\) answer"):
        backend.check_rows(prompts, [{"answer": 4}, {"other": 1}], where=lambda i: f"prompts.jsonl, line {i + 1}")
    countdown = RuleReward("countdown")
    countdown.check_rows([user("Using the numbers [1, 2], create an equation that equals 3.")], [{}])
    with pytest.raises(ConfigError, match="row 0: .*'nums' and 'target'"):
        countdown.check_rows([user("Make 3.")], [{}])


def test_the_score_cache_keys_rule_scores_on_the_columns(tmp_path):
    cached = CachedReward(RuleReward("countdown"), tmp_path / "s.sqlite")
    prompts = [user("Solve it.")] * 2
    first = cached.score(prompts, ["<answer>3 + 4</answer>"] * 2, [{"nums": [3, 4], "target": 7}, {"nums": [3, 4], "target": 8}])
    assert first == [1.0, 0.1]


def test_prompt_templates_and_columns_reach_the_rl_verifier(tmp_path, toy_tokenizer_dir):
    """Countdown-Tasks-3to4 rows (nums, target; no prompt column) become prompts through a template, keep
    their columns for the verifier, and a row without them is refused before any model is loaded."""
    import json

    from alignkit.config import ModelConfig
    from alignkit.generation import PromptSource, load_prompts
    from alignkit.train.rl import RLConfig, run_rl

    rows = [{"nums": [3, 8, 1], "target": 24}, {"nums": [2, 5], "target": 10}]
    (tmp_path / "cd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = PromptSource(dataset=str(tmp_path / "cd.jsonl"), split="train", template="Using the numbers {nums}, make {target}.")
    got = load_prompts(src)
    assert got[1]["messages"] == [{"role": "user", "content": "Using the numbers [2, 5], make 10."}]
    assert got[1]["columns"] == {"nums": [2, 5], "target": 10}
    with pytest.raises(ConfigError, match="plain column name"):
        load_prompts(PromptSource(dataset=str(tmp_path / "cd.jsonl"), split="train", template="{nums.__class__}"))
    skipped = load_prompts(PromptSource(dataset=str(tmp_path / "cd.jsonl"), split="train", template="{target}", skip_prompts=1))
    assert [p["id"] for p in skipped] == [1]

    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "Make 24 from three numbers."}) + "\n")
    cfg = RLConfig(output_dir=str(tmp_path / "run"), model=ModelConfig(name_or_path=str(toy_tokenizer_dir)),
                   prompts=PromptSource(dataset=str(tmp_path / "bad.jsonl"), split="train"),
                   reward=RewardConfig(kind="rule", rule="countdown"))
    with pytest.raises(ConfigError, match=r"prompts: .*bad.jsonl, line 1: .*'nums' and 'target'"):
        run_rl(cfg)
    assert not (tmp_path / "run").exists()
