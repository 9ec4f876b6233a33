"""`tiny:<arch>` models: randomly initialised, a few hundred thousand parameters, built in seconds.

They exist so that every code path (generation, LoRA, saving, reward heads, Ray plumbing) can be
tested on a laptop without a model hub. Their tokenizer is a small byte-level BPE trained in-process
on the fixed text below, so it handles any UTF-8 input, needs no download and gives short enough
sequences to keep tests fast. The build is deterministic: the same text, trainer settings and seed
give the same tokenizer and the same weights on every machine, and the global torch RNG is left
untouched (the seed is applied inside `torch.random.fork_rng`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2
VOCAB_SIZE = 512  # an upper bound: the corpus yields about 460 tokens
MAX_POSITIONS = 512
SEED = 1234

# ChatML, as SmolLM2 and Qwen2 use it, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Fixed training text for the tiny BPE. Changing it changes every tiny model: then bump
# raylign.models.registry.CACHE_FORMAT so existing caches are rebuilt.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A good answer is short, clear and kind.
What is the capital of France? The capital of France is Paris. What is the capital of Italy? It is Rome.
Please write a short poem about the sea. The sea is wide and blue, and the waves come in and go out.
How do I make a cup of tea? Boil the water, put the tea in the cup, pour the water and wait a few minutes.
Thank you for your help! You are welcome. I am happy to help you with anything else you need.
Can you explain what a language model is? A language model predicts the next word from the words before it.
People like answers that are honest, helpful and harmless. They do not like answers that are rude or wrong.
The weather today is sunny and warm. Tomorrow it will rain in the morning and clear up in the afternoon.
My favourite book is about a girl who travels around the world with her dog and her old grandfather.
Summarise the text in one sentence. Translate the sentence into French. Give three reasons and one example.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten; 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 2024.
The system says: you are a helpful assistant. The user asks a question and the assistant gives the answer.
I think this is a great idea, but we should check the details first. Let us start with the first step.
Water boils at one hundred degrees. The sun rises in the east and sets in the west. Cats like to sleep.
Good morning! How are you today? I am fine, thanks. What would you like to do this weekend?
Learning takes time and practice. Read every day, ask questions, and do not be afraid to make mistakes.
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE over `_CORPUS` with ChatML specials; eos is `<|im_end|>`, pad is `<pad>`."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator([_CORPUS], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tokenizer_as_loaded(tokenizer, config: PretrainedConfig, out_dir: Path) -> PreTrainedTokenizerBase:
    """Save the tokenizer next to the model config and return what `AutoTokenizer` loads from there.

    For some model types transformers ignores the saved tokenizer class and rebuilds the tokenizer
    with its own class (v5: qwen2 -> Qwen2Tokenizer, which also adds an `<|endoftext|>` token). The
    model is sized from the tokenizer returned here, so the shipped tokenizer, its length and the
    embedding matrix agree with what every later load sees.
    """
    tokenizer.save_pretrained(out_dir)
    config.save_pretrained(out_dir)
    loaded = AutoTokenizer.from_pretrained(out_dir)
    if type(loaded) is not type(tokenizer) or len(loaded) != len(tokenizer):
        loaded.save_pretrained(out_dir)
    return loaded


class SpecialIds(TypedDict):
    """The tokenizer's special-token ids, as config and generation-config keywords."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None


class _DecoderSizes(TypedDict):
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


# Sizes shared by the Llama-style tiny decoders: grouped-query attention, 4 query and 2 kv heads.
_DECODER_SIZES: _DecoderSizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 2}


def _llama_config(vocab_size: int, ids: SpecialIds) -> PretrainedConfig:
    """Llama with grouped-query attention and untied embeddings."""
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS,
                       tie_word_embeddings=False, **_DECODER_SIZES, **ids)


def _qwen2_config(vocab_size: int, ids: SpecialIds) -> PretrainedConfig:
    """Qwen2 (q/k/v biases) with tied embeddings, the other common layout of small chat models."""
    return Qwen2Config(vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS,
                       tie_word_embeddings=True, **_DECODER_SIZES, **ids)


def _gpt2_config(vocab_size: int, ids: SpecialIds) -> PretrainedConfig:
    """GPT-2: learned absolute positions and Conv1D layers, which LoRA and merging treat specially."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=MAX_POSITIONS,
        **ids,
    )


# The registry (raylign.models.registry) names and describes these; keep the two in step.
TINY_ARCHS: dict[str, Callable[[int, SpecialIds], PretrainedConfig]] = {
    "llama": _llama_config,
    "qwen2": _qwen2_config,
    "gpt2": _gpt2_config,
}


def build_tiny(arch: str, out_dir: Path) -> None:
    """Write a complete HF model directory for `tiny:<arch>` (weights, config, tokenizer) to `out_dir`."""
    make_config = TINY_ARCHS[arch]
    trained = build_tokenizer()
    tokenizer = tokenizer_as_loaded(trained, make_config(len(trained), _special_ids(trained)), out_dir)
    ids = _special_ids(tokenizer)
    config = make_config(len(tokenizer), ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out_dir)
