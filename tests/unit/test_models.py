"""raylign.models on tiny models: building, resolving, generating, LoRA, saving, scalar heads, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
)

import raylign.models as rm
from raylign.config import LoraConfig, ModelConfig
from raylign.models import (
    ModelNotFoundError,
    ScalarHeadModel,
    list_models,
    load_backbone,
    load_causal_lm,
    load_classifier,
    load_scalar_model,
    load_tokenizer,
    load_value_model,
    pull_model,
    registry,
    resolve_model_path,
    save_model,
    tiny,
)
from raylign.models.cache import MARKER_FILE, read_marker
from raylign.models.heads import last_token_index

TINY = ["tiny:llama", "tiny:qwen2", "tiny:gpt2"]
CHAT = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
]


@pytest.fixture(scope="module", autouse=True)
def raylign_home(tmp_path_factory):
    """A private model cache for this module, so nothing depends on (or writes to) the user's."""
    home = tmp_path_factory.mktemp("raylign_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYLIGN_HOME", str(home))
        yield home


def chat_batch(tokenizer, padding_side: str = "left") -> dict[str, torch.Tensor]:
    tokenizer.padding_side = padding_side
    return dict(
        tokenizer.apply_chat_template(
            CHAT, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
        )
    )


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def perturb_lora(model, seed: int = 0) -> None:
    """peft initialises lora_B to zero (a no-op adapter); give it weights that change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


# --------------------------------------------------------------------------------------------------
# Public API and registry
# --------------------------------------------------------------------------------------------------


def test_public_api_is_complete_and_lazy():
    assert sorted(rm.__all__) == sorted(rm._EXPORTS)
    for name in rm.__all__:
        assert getattr(rm, name) is not None
    # Listing models (the CLI) must not import torch/transformers.
    code = (
        "import sys, raylign.models as m; m.list_models(); "
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_names_every_tiny_arch():
    tiny_names = {m["name"] for m in list_models() if m["kind"] == "tiny"}
    assert tiny_names == {f"tiny:{arch}" for arch in tiny.TINY_ARCHS}
    assert {m["name"] for m in list_models() if m["kind"] == "builtin"} == {
        "builtin:smollm2-135m-instruct",
        "builtin:minilm-l6",
    }


def test_pull_caches_once_and_list_reports_it(raylign_home):
    path = Path(pull_model("tiny:llama"))
    assert path == raylign_home / "models" / "tiny-llama"
    assert read_marker(path)["name"] == "tiny:llama"
    start = time.perf_counter()
    assert pull_model("tiny:llama") == str(path)
    assert time.perf_counter() - start < 0.5
    entry = next(m for m in list_models() if m["name"] == "tiny:llama")
    assert entry["cached"] is True and entry["path"] == str(path)
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]


def test_stale_cache_format_is_rebuilt():
    path = Path(pull_model("tiny:gpt2"))
    (path / MARKER_FILE).write_text(json.dumps({"name": "tiny:gpt2", "format": registry.CACHE_FORMAT - 1}))
    assert not next(m for m in list_models() if m["name"] == "tiny:gpt2")["cached"]
    assert pull_model("tiny:gpt2") == str(path)
    assert read_marker(path)["format"] == registry.CACHE_FORMAT
    assert not [p for p in path.parent.iterdir() if ".old" in p.name or ".tmp" in p.name]


# --------------------------------------------------------------------------------------------------
# Tiny models: determinism, tokenizer, generation, save/reload
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(tiny.TINY_ARCHS))
def test_tiny_build_is_deterministic_and_keeps_global_rng(tmp_path, arch):
    torch.manual_seed(42)
    before = torch.get_rng_state()
    tiny.build_tiny(arch, tmp_path / "a")
    tiny.build_tiny(arch, tmp_path / "b")
    assert torch.equal(before, torch.get_rng_state())
    first, second = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert sum(t.numel() for t in first.values()) < 1_000_000


@pytest.mark.parametrize("name", TINY)
def test_tiny_tokenizer_chat_template_and_special_ids(name):
    model, tokenizer = load_causal_lm(name)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end
    assert model.generation_config.eos_token_id == im_end
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != im_end
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings
    text = tokenizer.apply_chat_template(CHAT[0], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    sample = "Hello, wörld! 123 🙂"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample


@pytest.mark.parametrize("name", TINY)
def test_tiny_generate_save_reload_identical(tmp_path, name):
    model, tokenizer = load_causal_lm(name)
    model.eval()
    batch = chat_batch(tokenizer)
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert batch["input_ids"].shape[1] < generated.shape[1] <= batch["input_ids"].shape[1] + 6

    out = save_model(model, tokenizer, tmp_path / "saved")
    assert out == tmp_path / "saved" and not (tmp_path / "saved.tmp").exists()
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert torch.equal(logits_of(model, batch), logits_of(reloaded, batch))
    assert torch.equal(chat_batch(reloaded_tok)["input_ids"], batch["input_ids"])
    assert torch.equal(reloaded.generate(**batch, max_new_tokens=6, do_sample=False), generated)


def test_save_model_replaces_an_existing_directory(tmp_path):
    model, tokenizer = load_causal_lm("tiny:llama")
    target = tmp_path / "final"
    save_model(model, tokenizer, target)
    (target / "stale.txt").write_text("from an older save")
    save_model(model, tokenizer, target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_dtype_and_padding_side_follow_the_caller():
    model, _ = load_causal_lm(ModelConfig(path="tiny:llama", dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_causal_lm("tiny:llama", dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16
    assert load_tokenizer("tiny:llama", padding_side="left").padding_side == "left"
    assert load_tokenizer("tiny:llama", padding_side="right").padding_side == "right"


def test_missing_pad_token_falls_back_to_eos():
    tokenizer = load_tokenizer("tiny:gpt2")
    tokenizer.pad_token = None
    rm.ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token


# --------------------------------------------------------------------------------------------------
# LoRA and gradient checkpointing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:gpt2"])
def test_lora_merge_matches_the_saved_model(tmp_path, name):
    base, tokenizer = load_causal_lm(name)
    model, _ = load_causal_lm(ModelConfig(path=name, lora=LoraConfig(r=4, alpha=8)))
    assert rm.is_peft_model(model)
    perturb_lora(model)
    model.eval()
    batch = chat_batch(tokenizer)
    adapted = logits_of(model, batch)
    assert not torch.allclose(adapted, logits_of(base.eval(), batch), atol=1e-3), "adapter must matter"

    save_model(model, tokenizer, tmp_path / "merged", merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits_of(merged, batch), adapted, atol=1e-5, rtol=1e-5)

    # The live model is untouched by the save: still adapted, still trainable.
    assert rm.is_peft_model(model)
    assert torch.equal(logits_of(model, batch), adapted)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_unmerged_lora_saves_the_adapter_and_loads_back(tmp_path):
    model, tokenizer = load_causal_lm(ModelConfig(path="tiny:llama", lora=LoraConfig(r=4, alpha=8)))
    perturb_lora(model, seed=1)
    model.eval()
    batch = chat_batch(tokenizer)
    save_model(model, tokenizer, tmp_path / "adapter", merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "config.json").exists()
    again, _ = load_causal_lm(str(tmp_path / "adapter"))
    assert rm.is_peft_model(again)
    assert any(p.requires_grad for n, p in again.named_parameters() if "lora_" in n)
    torch.testing.assert_close(logits_of(again.eval(), batch), logits_of(model, batch))


def test_lora_target_list_and_gradient_checkpointing_train():
    cfg = ModelConfig(
        path="tiny:llama",
        gradient_checkpointing=True,
        lora=LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    model, tokenizer = load_causal_lm(cfg)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    assert model.get_base_model().is_activation_checkpointing
    model.train()
    batch = chat_batch(tokenizer, padding_side="right")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# --------------------------------------------------------------------------------------------------
# Scalar models: reward model, critic, classifier
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:gpt2"])
def test_reward_model_scores_last_real_token_and_round_trips(tmp_path, name):
    model, tokenizer = load_scalar_model(name)
    assert type(model).__name__.endswith("ForSequenceClassification")
    model.eval()
    texts = ["a much longer answer that needs padding on the right", "short"]
    tokenizer.padding_side = "right"
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    scores = logits_of(model, batch)
    assert scores.shape == (2, 1)
    alone = logits_of(model, dict(tokenizer(texts[1:], return_tensors="pt")))
    torch.testing.assert_close(scores[1:], alone, atol=1e-5, rtol=1e-5)

    save_model(model, tokenizer, tmp_path / "rm")
    again, _ = load_scalar_model(str(tmp_path / "rm"))
    assert torch.equal(logits_of(again.eval(), batch), scores)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert torch.equal(logits_of(plain, batch), scores)


def test_reward_model_on_an_encoder_backbone(tmp_path):
    """BERT-style backbones (like builtin:minilm-l6) score through their own pooled [CLS] head."""
    src = tmp_path / "tiny-bert"
    tokenizer = tiny.build_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(src)
    tokenizer.save_pretrained(src)

    model, tok = load_scalar_model(str(src))
    assert type(model).__name__ == "BertForSequenceClassification"
    model.eval()
    batch = dict(tok(["good answer", "a bad and long answer"], return_tensors="pt", padding=True))
    scores = logits_of(model, batch)
    assert scores.shape == (2, 1)
    save_model(model, tok, tmp_path / "rm")
    again, _ = load_scalar_model(str(tmp_path / "rm"))
    torch.testing.assert_close(logits_of(again.eval(), batch), scores, atol=1e-6, rtol=1e-5)
    embedder, _ = load_backbone(str(src))
    with torch.no_grad():
        assert embedder(**batch).last_hidden_state.shape == (*batch["input_ids"].shape, 32)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_value_model_gives_one_value_per_token(padding_side):
    model, tokenizer = load_value_model("tiny:qwen2")
    assert isinstance(model, ScalarHeadModel)
    tokenizer.padding_side = padding_side
    batch = dict(tokenizer(["one two three four five", "six"], return_tensors="pt", padding=True))
    with torch.no_grad():
        out = model(**batch)
    assert out.values.shape == batch["input_ids"].shape
    assert torch.count_nonzero(out.values) == 0, "a fresh value head starts at zero"
    with torch.no_grad():
        model.score.weight.normal_(generator=torch.Generator().manual_seed(0))
        out = model(**batch)
    seq_len = batch["input_ids"].shape[1]
    last = last_token_index(batch["attention_mask"], seq_len, 2)
    short_len = len(tokenizer("six")["input_ids"])
    assert last.tolist() == [seq_len - 1, short_len - 1 if padding_side == "right" else seq_len - 1]
    torch.testing.assert_close(out.logits[:, 0], out.values[torch.arange(2), last])


def test_scalar_head_model_saves_and_loads_back(tmp_path):
    cfg = ModelConfig(path="tiny:llama", lora=LoraConfig(r=2, alpha=4))
    model, tokenizer = load_value_model(cfg)
    assert rm.is_peft_model(model.backbone)
    perturb_lora(model.backbone)
    with torch.no_grad():
        model.score.weight.normal_(generator=torch.Generator().manual_seed(1))
        model.score.bias.fill_(0.25)
    batch = dict(tokenizer(["hello there", "hi"], return_tensors="pt", padding=True))
    model.eval()
    with torch.no_grad():
        expected = model(**batch).values

    save_model(model, tokenizer, tmp_path / "critic")
    assert (tmp_path / "critic" / "score_head.safetensors").is_file()
    for loader in (load_value_model, load_scalar_model):
        again, _ = loader(str(tmp_path / "critic"))
        assert isinstance(again, ScalarHeadModel) and not rm.is_peft_model(again.backbone)
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(**batch).values, expected, atol=1e-5, rtol=1e-5)
    AutoModel.from_pretrained(tmp_path / "critic")  # the backbone part is a plain HF directory


def test_classifier_has_the_requested_number_of_labels():
    model, tokenizer = load_classifier("tiny:qwen2", num_labels=3)
    batch = dict(tokenizer(["x", "y z"], return_tensors="pt", padding=True))
    assert logits_of(model.eval(), batch).shape == (2, 3)
    lora_model, _ = load_classifier(
        ModelConfig(path="tiny:qwen2", lora=LoraConfig(r=2, alpha=4)), num_labels=2
    )
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable), "the new head must train along with the adapters"


# --------------------------------------------------------------------------------------------------
# Errors a user can fix
# --------------------------------------------------------------------------------------------------


def test_unknown_hub_id_is_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="builtin:smollm2-135m-instruct") as info:
        resolve_model_path("no-such-org/no-such-model")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "no-such-org/no-such-model" in message and "tiny:llama" in message and "\n" not in message
    with pytest.raises(ModelNotFoundError):
        load_causal_lm("no-such-org/no-such-model")


def test_unknown_builtin_or_tiny_name_suggests_the_closest():
    with pytest.raises(ModelNotFoundError, match="Did you mean 'tiny:llama'"):
        resolve_model_path("tiny:lama")
    with pytest.raises(ModelNotFoundError, match="builtin:minilm-l6"):
        resolve_model_path("builtin:nope")


def test_bad_local_paths_are_reported_as_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve_model_path(str(tmp_path))


def _fake_hub_cache(hf_home: Path, repo_id: str, source: Path, with_weights: bool = True) -> None:
    """Lay out `source` as huggingface_hub's cache would after a download of `repo_id`."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if with_weights or file.suffix != ".safetensors":
            (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_hub_id_resolves_from_the_local_hf_cache_when_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub")
    )  # read at import
    source = Path(pull_model("tiny:llama"))
    _fake_hub_cache(tmp_path / "hf", "someone/cached-model", source)
    _fake_hub_cache(tmp_path / "hf", "someone/pickle-only", source, with_weights=False)

    model, _ = load_causal_lm("someone/cached-model")
    assert type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(ModelNotFoundError, match="no safetensors weights"):
        resolve_model_path("someone/pickle-only")
