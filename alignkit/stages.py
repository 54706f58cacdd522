"""The stage table: every stage's name, config dataclass, run function and one-line help.

Below the CLI and the pipeline runner, which both read it: `alignkit <stage>` parses the stage's
config and calls its run function; `alignkit run` runs the same entries from a pipeline file. The
two stages that themselves run the pipeline, `run` and `demo`, are not in this table: the CLI
(the top of the import graph) adds them, so the table and the pipeline never import the CLI, the
demo or the pipeline (tests/test_layout.py checks the graph).

Also here: the two small configs that have no module of their own (init-model, data-stats), with
their run functions. Simplified: a stage is a plain function of one config; nothing is registered
from outside this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .evaluate.run import EvalConfig, run_eval
from .evaluate.text_metrics import TextMetricsConfig, run_text_metrics
from .generation import GenerateConfig, run_generate
from .loops.pairs import PairsConfig, run_pairs
from .loops.augment import AugmentConfig, run_augment
from .loops.curriculum import CurriculumConfig, run_curriculum
from .report import ReportConfig, run_report
from .rounds import SelfImproveConfig, run_self_improve
from .rewards.server import ServeRewardConfig, serve_reward
from .testtime.bon import BonConfig, run_bon
from .testtime.chat_server import ServeChatConfig, serve_chat
from .testtime.refine import RefineConfig, run_refine
from .train.dpo import DPOConfig, run_dpo
from .train.rl import RLConfig, run_rl
from .train.rm import RMConfig, run_rm
from .train.sft import SFTConfig, run_sft


@dataclass
class InitModelConfig:
    model_config: str = "Qwen/Qwen2.5-0.5B"
    """Architecture: a Hub id, or a local folder with config.json (e.g. ../shared/models/qwen2.5-0.5b)."""
    tokenizer: str | None = None
    """Tokenizer id or folder; defaults to `model_config`."""
    output_dir: str = "runs/init-model"
    overrides: list[str] = field(default_factory=list)
    """Config fields to change, as key=value (also accepted as trailing arguments)."""
    chat_template: str | None = None
    """Chat template for a tokenizer that lacks one (default ChatML)."""
    seed: int = 0
    trust_remote_code: bool = False


@dataclass
class DataStatsConfig:
    dataset: str = "HuggingFaceTB/smol-smoltalk"
    subset: str | None = None
    split: str = "train"
    tokenizer: str = "Qwen/Qwen2.5-0.5B"
    """Tokenizer (with its chat template) used to count tokens."""
    max_examples: int | None = 2000
    """Rows to sample (seeded); unset reads them all."""
    first_turn_only: bool = False
    skip_invalid: bool = True
    seed: int = 42


def run_init_model(cfg: InitModelConfig):
    from .models import init_model, parse_overrides

    return init_model(cfg.model_config, cfg.output_dir, cfg.tokenizer, parse_overrides(cfg.overrides),
                      cfg.seed, cfg.trust_remote_code, cfg.chat_template)


def run_data_stats(cfg: DataStatsConfig):
    from .data.stats import data_stats

    return data_stats(cfg)


@dataclass
class MergeConfig:
    source: str = "runs/sft/final"
    """An adapter folder (adapter_config.json): a LoRA run's final/ or one of its checkpoints."""
    output_dir: str = "runs/merged"
    """Where the merged model (base + adapter, plain Hugging Face format) is written."""
    trust_remote_code: bool = False


def run_merge(cfg: MergeConfig):
    import shutil
    from pathlib import Path

    from .config import ConfigError
    from .models import is_adapter_dir, merge_adapter_dir

    if not is_adapter_dir(cfg.source):
        raise ConfigError(f"source: {cfg.source} holds no adapter_config.json; merge takes a LoRA adapter folder")
    out = Path(cfg.output_dir)
    tmp = out / ".tmp-merge"  # inside output_dir, which may already hold other files (a pipeline's stage.json)
    if tmp.exists():
        shutil.rmtree(tmp)
    merge_adapter_dir(cfg.source, tmp, cfg.trust_remote_code)
    # Each file moves into place in one rename; the weights last, so a folder with weights is complete.
    for f in sorted(tmp.iterdir(), key=lambda f: f.name.endswith(".safetensors")):
        f.replace(out / f.name)
    tmp.rmdir()
    return out


@dataclass
class Stage:
    config: type
    run: Callable
    help: str
    positional: str | None = None
    """Config field that a first argument not starting with '-' fills (`alignkit run PIPELINE.yaml`,
    `alignkit report RUN_DIR`)."""


STAGES = {
    "sft": Stage(SFTConfig, run_sft, "supervised fine-tuning on chat data (loss on assistant tokens only)"),
    "dpo": Stage(DPOConfig, run_dpo,
        "direct preference optimisation (sigmoid, IPO, DPO-Positive, KL, length-normalised, SimPO, ORPO) on "
        "preference pairs; KTO on unpaired rows"),
    "rm": Stage(RMConfig, run_rm,
        "train a Bradley-Terry reward model on preference pairs (causal LM or encoder)"),
    "rl": Stage(RLConfig, run_rl,
        "online RL (RLOO, GRPO) against any reward: sample, score, update, in the one training loop"),
    "generate": Stage(GenerateConfig, run_generate, "generate responses for a prompt set (resumable JSONL)"),
    "eval": Stage(EvalConfig, run_eval,
        "win rate of a model or responses file against a reference, judged by a reward backend"),
    "bon": Stage(BonConfig, run_bon,
        "best-of-N: sample N answers per prompt, keep the reward's best; sweep temperatures x N against a "
        "reference"),
    "report": Stage(ReportConfig, run_report,
        "Markdown report of a run directory with PNG plots: stages, curves, win rates, samples",
        positional="run_dir"),
    "serve-reward": Stage(ServeRewardConfig, serve_reward,
        "serve a reward backend through the OpenAI-compatible reward API (loopback by default)"),
    "refine": Stage(RefineConfig, run_refine,
        "a teacher (self, a local model or a chat API) rewrites a student's answers; a reward keeps the "
        "better"),
    "serve-chat": Stage(ServeChatConfig, serve_chat,
        "serve a local model as an OpenAI-compatible /v1/chat/completions (loopback by default)"),
    "text-metrics": Stage(TextMetricsConfig, run_text_metrics,
        "perplexity of reference replies and BLEU of generated replies on a chat set"),
    "init-model": Stage(InitModelConfig, run_init_model,
        "write a randomly initialised model in Hugging Face format"),
    "data-stats": Stage(DataStatsConfig, run_data_stats, "token-length percentiles of prompts and responses"),
    "pairs": Stage(PairsConfig, run_pairs,
        "preference pairs from the policy's own samples (rejection, self, best-worst, refine) for alignkit dpo, "
        "with card.json"),
    "self-improve": Stage(SelfImproveConfig, run_self_improve,
        "iterative (online) DPO: rounds of sample -> pairs -> DPO from the latest model, each round's win rate "
        "against round 0"),
    "curriculum": Stage(CurriculumConfig, run_curriculum,
        "per-category loss rates from an eval; new prompts for the weakest categories from seed prompts"),
    "augment": Stage(AugmentConfig, run_augment,
        "new prompts from seed prompts, de-duplicated and diversity-filtered on embeddings, answered as SFT data"),
    "merge": Stage(MergeConfig, run_merge, "merge a LoRA adapter folder into its base: a plain Hugging Face model",
                   positional="source"),
}
"""Name -> stage, for every stage that does not run the pipeline (`run` and `demo` are the CLI's)."""
