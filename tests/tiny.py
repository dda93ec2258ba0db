"""The tests' shared helpers: tiny random models of every supported family built from configs, tiny tokenizers
built in code, calibration batches and text files -- everything offline, nothing from ../shared."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import transformers as tf

VOCAB = 128
HIDDEN = 64
LAYERS = 6

_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _alternating(n: int, period: int = 2) -> list[str]:
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]


CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: tf.MistralConfig(**_LLAMA_LIKE, sliding_window=None),
    "qwen2": lambda: tf.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: tf.Qwen3Config(**_LLAMA_LIKE, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**_LLAMA_LIKE, head_dim=16, sliding_window=4,
                                      layer_types=_alternating(LAYERS)),
    "gemma3": lambda: tf.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16, sliding_window=4,
                                          layer_types=_alternating(LAYERS, 3)),
    "phi3": lambda: tf.Phi3Config(**_LLAMA_LIKE),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, intermediate_size=128,
                                         max_position_embeddings=128),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=HIDDEN,
                                max_position_embeddings=128),
}


def tiny_config(family: str, layers: int = LAYERS, vocab_size: int = VOCAB):
    """``vocab_size=len(tokenizer)`` pairs the model with one of the tokenizers below (their ids 0, 1, 2 are
    pad, BOS and EOS, as here)."""
    config = CONFIGS[family]()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    config.vocab_size = vocab_size
    if layers != LAYERS:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = (config.layer_types * layers)[:layers]
    return config


def tiny_model(family: str, seed: int = 0, layers: int = LAYERS, vocab_size: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, layers, vocab_size))
    model.eval()
    return model


def tiny_inputs(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def small_llama(vocab_size: int, seed: int = 0, positions: int = 256) -> torch.nn.Module:
    """A 2-layer random Llama (hidden 32) for a given tokenizer's vocabulary: healing runs in seconds."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def greedy(model, ids: torch.Tensor, use_cache: bool = True, new_tokens: int = 8) -> torch.Tensor:
    """Greedy continuation of ``ids``, with or without the KV cache: surgery that leaves a stale layer index or
    config makes the two differ."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


def assert_reloads_exactly(model, directory, ids: torch.Tensor, new_tokens: int = 8):
    """A saved checkpoint, reloaded by plain transformers, gives ``model``'s logits, and its cached generation
    equals its uncached one. Returns the reloaded model."""
    reloaded = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits), "the reloaded checkpoint computes otherwise"
    cached = greedy(reloaded, ids, True, new_tokens)
    assert torch.equal(cached, greedy(reloaded, ids, False, new_tokens)), "cached generation differs"
    return reloaded


def tiny_calibration(batch: int = 2, seq: int = 12, seed: int = 1, padded: dict[int, int] | None = None,
                     pad_id: int | None = None, source: str = "test"):
    """Random-token calibration windows; ``padded`` maps a row to the position its padding starts at (masked
    out, and set to ``pad_id`` when one is given), so masks matter to what is being checked."""
    from depthprune import Calibration

    ids = tiny_inputs(batch, seq, seed)
    mask = torch.ones_like(ids)
    for row, start in (padded or {}).items():
        mask[row, start:] = 0
    if pad_id is not None:
        ids = ids.masked_fill(mask == 0, pad_id)
    return Calibration(ids, mask, {"source": source})


def byte_tokenizer():
    """A byte-level tokenizer built in code (259 tokens: <pad>, <s>, </s> and the 256 bytes), no download.

    It adds no BOS (like SmolLM2), so every window is plain text tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>")


@cache
def _trained_bpe(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([shipped_text(200_000)], trainer)
    return core.to_str()


def bpe_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained (in about a second, deterministically) on the shipped novel: merges
    make tokens of several characters, as real tokenizers do, and any text round-trips through it exactly.

    Ids 0, 1, 2 are <pad>, <s>, </s>; it adds no BOS (like SmolLM2). A fresh object per call: tests may change it.
    """
    from tokenizers import Tokenizer

    return tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_bpe(vocab_size)),
                                      bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def shipped_text(chars: int | None = None) -> str:
    """The start of the novel the package ships as its default calibration text (real English, always there)."""
    from depthprune.data.calibration import default_text_path

    return default_text_path().read_text(encoding="utf-8")[:chars]


def text_file(path, chars: int = 120_000) -> Path:
    """``chars`` characters of real text in a file, for commands and specs that take a path."""
    path = Path(path)
    path.write_text(shipped_text(chars), encoding="utf-8")
    return path


def save_tiny_checkpoint(path, family: str = "llama", layers: int = LAYERS, seed: int = 0, tokenizer=None):
    """A tiny random model with a working tokenizer (the byte tokenizer unless one is given) saved as a plain
    checkpoint (as a user's input model)."""
    tok = tokenizer if tokenizer is not None else byte_tokenizer()
    model = tiny_model(family, seed, layers, vocab_size=len(tok))
    from depthprune.models.load import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
