"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

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


def tiny_config(family: str, layers: int = LAYERS):
    config = CONFIGS[family]()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    if layers != LAYERS:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = (config.layer_types * layers)[:layers]
    return config


def tiny_model(family: str, seed: int = 0, layers: int = LAYERS) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, layers))
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


def save_tiny_checkpoint(path, family: str = "llama", layers: int = LAYERS, seed: int = 0):
    """A tiny random model with a working tokenizer saved as a plain checkpoint (as a user's input model)."""
    tok = byte_tokenizer()
    config = tiny_config(family, layers)
    config.vocab_size = len(tok)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    from depthprune.models.load import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
