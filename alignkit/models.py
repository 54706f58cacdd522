"""Load tokenizers and models, write Hugging Face checkpoints, and build random-init models.

LoRA (through peft, imported only when used): `apply_lora` wraps a model in adapters
(`model.lora`); `save_model` of such a model writes the adapter folder (adapter_config.json +
adapter_model.safetensors, the tokenizer and a generation config), whose base is recorded as an
absolute path (or a Hub id). Every loader here takes an adapter folder wherever it takes a model:
it loads the base (itself possibly an adapter folder), grows its vocabulary as training did, and
merges the adapter in (`merge_adapter_dir` writes that merged model). Simplified: the embedding rows
`fit_vocab` adds are not saved with an adapter (they are the same mean rows on every load), and
they do not train under LoRA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .config import ConfigError, ModelConfig
from .data.chat import detect_end_of_turn, ensure_chat_template

log = logging.getLogger(__name__)


@dataclass
class ChatTokenizer:
    """A tokenizer with a usable chat template and the id of the token that ends a reply."""

    tokenizer: object
    end_of_turn: str
    added_tokens: list[str]

    @property
    def end_of_turn_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.end_of_turn)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def stop_ids(self) -> list[int]:
        """Generation stops on the end-of-turn token, and on EOS where that differs (base models)."""
        ids = [self.end_of_turn_id]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids


def check_source(source: str, what: str) -> str:
    """A path-like source must exist locally; otherwise it would be looked up on the Hub."""
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"{what} not found: {source}")
    return source


def load_tokenizer(cfg: ModelConfig) -> ChatTokenizer:
    source = check_source(cfg.tokenizer or cfg.name_or_path, "tokenizer")
    revision = cfg.revision if source == cfg.name_or_path else None  # model.revision is model.name_or_path's
    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=cfg.trust_remote_code)
    added = ensure_chat_template(tok, cfg.chat_template)
    end_of_turn = cfg.end_of_turn_token or detect_end_of_turn(tok)
    if end_of_turn not in tok.get_vocab():
        raise ValueError(f"end-of-turn token {end_of_turn!r} is not in the tokenizer's vocabulary")
    if tok.pad_token is None:
        # Padding is masked out everywhere, so any existing token will do; EOS is the usual choice.
        tok.pad_token = tok.eos_token or end_of_turn
    return ChatTokenizer(tok, end_of_turn, added)


def load_causal_lm(cfg: ModelConfig, chat: ChatTokenizer, path: str | None = None, dtype: torch.dtype | None = None):
    """cfg's model, or the checkpoint at `path` (model.revision applies only to model.name_or_path itself).
    An adapter folder loads as its base with the adapter merged in."""
    source = path or cfg.name_or_path
    if is_adapter_dir(source):
        return load_adapter_merged(source, lambda base: load_causal_lm(cfg, chat, base, dtype))
    model = AutoModelForCausalLM.from_pretrained(
        check_source(source, "model"),
        revision=cfg.revision if source == cfg.name_or_path else None,
        trust_remote_code=cfg.trust_remote_code,
        dtype=dtype or torch.float32,
        **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}),
    )
    fit_vocab(model, chat.tokenizer)
    return model


def disable_dropout(model) -> int:
    """Set every dropout probability in `model` to 0 (TRL's `disable_dropout`); returns how many.

    RL and DPO compare log-probabilities of one model taken at different times (sampling vs loss,
    policy vs reference); dropout would make a model disagree with itself, so both stages turn it
    off unless asked not to. `nn.Dropout` modules are zeroed, and so are float attributes named
    `attention_dropout`/`dropout` of other modules (Qwen2's attention passes its own float to the
    attention kernel, which TRL's version misses). The model's config is left as it is, so a saved
    checkpoint keeps the dropout it was given.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p != 0:
            module.p = 0.0
            n += 1
        for name in ("attention_dropout", "dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and value != 0 and not isinstance(module, torch.nn.Dropout):
                setattr(module, name, 0.0)
                n += 1
    return n


def fit_vocab(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer has more tokens (e.g. ChatML tokens added).

    New rows (input, and output where it is a separate matrix) are the mean of the existing ones: the same
    on every load, so identical runs start from identical weights (and the DPO reference cache can hit).
    """
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return
    log.info("resizing embeddings to %d tokens (new rows: the mean of the existing ones)", len(tokenizer))
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    with torch.no_grad():
        for w in matrices:
            w[old:] = w[:old].mean(0)


def save_model(model, chat: ChatTokenizer, path: str | Path) -> None:
    """HF-format model + tokenizer (with chat template) + a generation config that stops on end-of-turn.
    A peft model writes its adapter folder instead of the full weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        base = model.get_base_model()
        base.config.pad_token_id = chat.pad_id
        stop = chat.stop_ids()
        gen = getattr(base, "generation_config", None) or GenerationConfig()
        gen.eos_token_id = stop if len(stop) > 1 else stop[0]
        gen.pad_token_id = chat.pad_id
        save_adapter(model, path)
        gen.save_pretrained(path)
        chat.tokenizer.save_pretrained(path)
        return
    stop = chat.stop_ids()
    gen = getattr(model, "generation_config", None) or GenerationConfig()
    gen.eos_token_id = stop if len(stop) > 1 else stop[0]
    gen.pad_token_id = chat.pad_id
    model.generation_config = gen
    model.config.pad_token_id = chat.pad_id
    model.save_pretrained(path)
    chat.tokenizer.save_pretrained(path)


def parse_overrides(items: list[str]) -> dict:
    """['hidden_size=64', 'num_hidden_layers=2'] -> {'hidden_size': 64, 'num_hidden_layers': 2}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def init_model(
    config_source: str,
    output_dir: str | Path,
    tokenizer_source: str | None = None,
    overrides: dict | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
) -> Path:
    """Write a randomly initialised causal LM (HF format) with a tokenizer and chat template."""
    overrides = overrides or {}
    config = AutoConfig.from_pretrained(check_source(config_source, "model config"), trust_remote_code=trust_remote_code)
    for key in overrides:
        if not hasattr(config, key):
            raise ValueError(f"{type(config).__name__} has no field {key!r}")
    if overrides:
        values = config.to_dict()
        if "num_hidden_layers" in overrides:
            values.pop("layer_types", None)  # derived per layer; rebuilt for the new depth
        config = type(config).from_dict(values | overrides)
    chat = load_tokenizer(
        ModelConfig(
            name_or_path=tokenizer_source or config_source,
            trust_remote_code=trust_remote_code,
            chat_template=chat_template,
        )
    )
    vocab = len(chat.tokenizer)
    if config.vocab_size < vocab:
        config.vocab_size = (vocab + 63) // 64 * 64
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    if chat.tokenizer.eos_token_id is not None:
        model.config.eos_token_id = chat.tokenizer.eos_token_id
    save_model(model, chat, output_dir)
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote a random %s with %.2fM parameters to %s", config.model_type, n / 1e6, output_dir)
    return Path(output_dir)


# --------------------------------------------------------------------------- LoRA (peft)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_dir(source) -> bool:
    """A local folder holding a peft adapter (adapter_config.json) rather than full weights."""
    return source is not None and (Path(source).expanduser() / ADAPTER_CONFIG).is_file()


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA (model.lora, adapter folders) needs peft: pip install 'alignkit[peft]'") from None
    return peft


def named_base(source) -> str:
    """What an adapter folder's adapter_config.json names as its base_model_name_or_path."""
    import json

    try:
        config = json.loads((Path(source).expanduser() / ADAPTER_CONFIG).read_text())
        base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    except ValueError as e:
        raise ConfigError(f"{source}/{ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{source}/{ADAPTER_CONFIG} names no base_model_name_or_path")
    return base


def adapter_base(source) -> str:
    """The base model an adapter folder was trained on (its adapter_config.json's
    base_model_name_or_path). The chain below it (a LoRA DPO on a LoRA SFT names the SFT adapter) is
    walked first: adapter folders that name each other would otherwise recurse without end."""
    base = named_base(source)
    chain, step = [Path(source).expanduser().resolve()], base
    while is_adapter_dir(step):
        here = Path(step).expanduser().resolve()
        if here in chain:
            loop = " -> ".join(str(p) for p in [*chain[chain.index(here):], here])
            raise ConfigError(f"adapter folders name each other as base ({loop}); a chain of adapters must "
                              "end in a full model")
        chain.append(here)
        step = named_base(step)
    return check_source(base, f"base model of the adapter in {source}")


def base_name(model) -> str:
    """What an adapter on `model` records as its base: the absolute path of a local folder, else the Hub id."""
    name = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    path = Path(name).expanduser()
    return str(path.resolve()) if name and path.exists() else name


def lora_settings(cfg, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """peft's LoraConfig for `model.lora` (cfg: a LoRAConfig)."""
    peft = require_peft()
    targets = cfg.target_modules
    return peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.r, lora_dropout=cfg.dropout,
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        task_type=task_type, modules_to_save=modules_to_save,
    )


def apply_lora(model, cfg, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """`model` with LoRA adapters (cfg: a LoRAConfig with r set); only the adapters (and modules_to_save) train."""
    peft = require_peft()
    base = base_name(model)
    wrapped = peft.get_peft_model(model, lora_settings(cfg, task_type, modules_to_save))
    wrapped.peft_config["default"].base_model_name_or_path = base
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("LoRA r=%d: %d trainable parameters of %d (%.2f%%)", cfg.r, trainable, total, 100 * trainable / max(total, 1))
    return wrapped


def with_lora(model, cfg: ModelConfig, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """`model` wrapped in LoRA adapters when model.lora.r is set; else `model` itself (full fine-tuning)."""
    if cfg.lora.r is None:
        return model
    return apply_lora(model, cfg.lora, task_type, modules_to_save)


def save_adapter(model, path: Path) -> None:
    """The adapter (and modules_to_save) as safetensors + adapter_config.json; never the base weights."""
    model.save_pretrained(path, save_embedding_layers=False, safe_serialization=True)
    readme = Path(path) / "README.md"  # peft's model card template: nothing of ours
    if readme.is_file():
        readme.unlink()


def load_adapter_merged(source, load_base):
    """An adapter folder's base (loaded by `load_base(base_source)`) with the adapter merged in."""
    peft = require_peft()
    base = load_base(adapter_base(source))
    model = peft.PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    # What this model is: the adapter folder (an adapter trained on it records that folder as its base).
    model.config._name_or_path = str(Path(source).expanduser().resolve())
    return model


def load_adapter_weights(model, directory: Path) -> None:
    """A checkpoint's adapter weights into the same peft model, exactly (resume, best-checkpoint restore)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(Path(directory) / ADAPTER_WEIGHTS)
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise RuntimeError(f"checkpoint {directory} does not match the adapters: unexpected {unexpected[:5]}")


class AdaptersOff:
    """The base model under a peft model's adapters: every forward runs with the adapters disabled
    (peft's disable_adapter), so LoRA's reference model is the policy's own base, no second copy."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __getattr__(self, name):
        return getattr(self.peft_model, name)

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def merge_adapter_dir(source, output_dir, trust_remote_code: bool = False) -> Path:
    """Write the merged model of an adapter folder (base + adapter, in fp32) as a plain HF model folder,
    with its tokenizer (chat template included) and, for a causal LM, the generation config."""
    import json

    cfg = ModelConfig(name_or_path=str(source), trust_remote_code=trust_remote_code)
    out = Path(output_dir)
    config = json.loads((Path(source) / ADAPTER_CONFIG).read_text())
    if config.get("task_type") == "SEQ_CLS":  # a LoRA reward model
        model = load_sequence_classifier(str(source))
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
        return out
    chat = load_tokenizer(cfg)
    save_model(load_causal_lm(cfg, chat), chat, out)
    return out


def load_sequence_classifier(source: str, dtype: torch.dtype | None = None, **kwargs):
    """A sequence classifier (reward model), or an adapter folder of one loaded as base + adapter merged."""
    from transformers import AutoModelForSequenceClassification

    if is_adapter_dir(source):
        tokenizer = AutoTokenizer.from_pretrained(source)

        def load_base(base):
            model = load_sequence_classifier(base, dtype, **kwargs)
            fit_vocab(model, tokenizer)
            model.config.pad_token_id = tokenizer.pad_token_id
            return model

        return load_adapter_merged(source, load_base)
    return AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype or torch.float32, **kwargs)
