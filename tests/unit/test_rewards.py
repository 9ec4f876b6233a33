"""Reward sources: VADER, length, user functions, reward models, the weighted mix, spec errors."""

from __future__ import annotations

import itertools
import math
import sys
import textwrap

import numpy as np
import pytest

from raylign.config import RewardConfig
from raylign.rewards import (
    RewardSource,
    RewardSourceError,
    WeightedMix,
    build_reward,
    build_reward_source,
)
from raylign.rewards.function import FunctionReward
from raylign.rewards.length import LengthReward
from raylign.rewards.lexicon import VaderReward

_module_ids = itertools.count()


def user_module(tmp_path, monkeypatch, source: str) -> str:
    """Write `source` as a fresh module on sys.path and return its (unique) name."""
    name = f"user_rewards_{next(_module_ids)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# ---- lexicon:vader -------------------------------------------------------------------------------


def test_vader_prefers_positive_text():
    vader = build_reward_source("lexicon:vader")
    assert isinstance(vader, VaderReward) and isinstance(vader, RewardSource)
    assert vader.name == "lexicon:vader"
    scores = vader.score(["How was it?"] * 3, [
        "It was wonderful, I love it and I am so happy!",
        "It was awful. I hate it, terrible and sad.",
        "It was on Tuesday.",
    ])
    assert scores.dtype == np.float32 and scores.shape == (3,)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0
    assert np.all((scores >= -1) & (scores <= 1))


def test_vader_normalisation_and_prompt_ignored():
    vader = build_reward_source("lexicon:vader")
    # One word rated 1.9 by humans: compound = 1.9 / sqrt(1.9^2 + 15).
    expected = 1.9 / math.sqrt(1.9**2 + 15)
    assert vader.score(None, ["good"])[0] == pytest.approx(expected, abs=1e-4)
    chat = [{"role": "user", "content": "terrible awful question"}]
    assert vader.score([chat], ["good"])[0] == vader.score(["x"], ["good"])[0]
    assert vader.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        vader.score(["a", "b"], ["good"])


# ---- length --------------------------------------------------------------------------------------


def test_length_in_words_without_tokenizer():
    length = build_reward_source("length")
    assert isinstance(length, LengthReward) and length.unit == "words"
    scores = length.score(None, ["one two  three", "", "  single  ", "a\nb\tc d"])
    assert scores.dtype == np.float32
    assert scores.tolist() == [3.0, 0.0, 1.0, 4.0]


def test_length_in_tokens_with_tokenizer():
    from raylign.models import load_tokenizer

    tokenizer = load_tokenizer("tiny:llama")
    texts = ["The capital of France is Paris.", "hi", ""]
    expected = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    by_object = build_reward_source("length", tokenizer=tokenizer)
    by_name = LengthReward("tiny:llama")
    assert by_object.unit == "tokens"
    assert by_object.score(None, texts).tolist() == expected == by_name.score(None, texts).tolist()
    assert expected[0] > 1 and expected[2] == 0


# ---- function sources ----------------------------------------------------------------------------


def test_function_source_both_spellings(tmp_path, monkeypatch):
    mod = user_module(tmp_path, monkeypatch, """
        def politeness(prompts, completions):
            return [float("please" in c) + 0.5 * len(p or "") for p, c in zip(prompts, completions)]

        class Scorer:
            @staticmethod
            def exclaim(prompts, completions):
                return (c.count("!") for c in completions)
    """)
    completions = ["please help", "no", "yes!!"]
    prompts = ["ab", None, ""]
    for spec in (f"function:{mod}:politeness", f"{mod}:politeness"):
        source = build_reward_source(spec)
        assert isinstance(source, FunctionReward) and source.name == spec
        np.testing.assert_array_equal(source.score(prompts, completions), np.float32([2.0, 0.0, 0.0]))
    generator = build_reward_source(f"{mod}:Scorer.exclaim")  # dotted attribute, a generator result
    assert generator.score(None, completions).tolist() == [0.0, 0.0, 2.0]


def test_function_source_found_in_working_directory(tmp_path, monkeypatch):
    name = f"cwd_rewards_{next(_module_ids)}"
    (tmp_path / f"{name}.py").write_text("def one(prompts, completions):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    assert build_reward_source(f"{name}:one").score(None, ["a", "b"]).tolist() == [1.0, 1.0]
    assert sys.path == before  # the working directory was added only for the import


def test_function_source_errors_name_the_spec(tmp_path, monkeypatch):
    mod = user_module(tmp_path, monkeypatch, """
        import math
        THRESHOLD = 3
        def short(prompts, completions):
            return [1.0]
        def nothing(prompts, completions):
            return None
        def nan(prompts, completions):
            return [math.nan] * len(completions)
        def matrix(prompts, completions):
            return [[1.0, 2.0]] * len(completions)
        def words(prompts, completions):
            return ["high"] * len(completions)
        def boom(prompts, completions):
            raise KeyError("user bug")
    """)
    two = ["a", "b"]
    cases = {
        "short": "returned 1 scores for 2 completions",
        "nothing": "returned None",
        "nan": "non-finite",
        "matrix": r"shape \(2, 2\)",
        "words": "not a list of numbers",
    }
    for attr, message in cases.items():
        spec = f"function:{mod}:{attr}"
        with pytest.raises(RewardSourceError, match=message) as info:
            build_reward_source(spec).score(None, two)
        assert spec in str(info.value)
    with pytest.raises(KeyError, match="user bug"):  # bugs in the user's code keep their traceback
        build_reward_source(f"{mod}:boom").score(None, two)
    with pytest.raises(RewardSourceError, match=f"'{mod}:THRESHOLD' is a int, not a function"):
        build_reward_source(f"{mod}:THRESHOLD")
    with pytest.raises(RewardSourceError, match="has no attribute 'missing'.*Callables it defines: .*short"):
        build_reward_source(f"function:{mod}:missing")


def test_function_source_import_failures(tmp_path, monkeypatch):
    broken = user_module(tmp_path, monkeypatch, "raise RuntimeError('config file missing')\n")
    needs = user_module(tmp_path, monkeypatch, "import no_such_dependency_xyz\n")
    with pytest.raises(RewardSourceError, match="no module named 'no_such_module_xyz'") as info:
        build_reward_source("function:no_such_module_xyz:score")
    assert "function:no_such_module_xyz:score" in str(info.value)
    with pytest.raises(RewardSourceError, match=f"importing module '{broken}' failed: RuntimeError"):
        build_reward_source(f"{broken}:score")
    with pytest.raises(RewardSourceError, match="needs 'no_such_dependency_xyz'"):
        build_reward_source(f"{needs}:score")
    with pytest.raises(RewardSourceError, match="expected 'module:attr'"):
        build_reward_source("function:just_a_module")


# ---- spec errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty reward source spec"),
        ("   ", "empty reward source spec"),
        ("lexicon:afinn", "unknown lexicon 'lexicon:afinn'; available: lexicon:vader"),
        ("vader", "Did you mean 'lexicon:vader'"),
        ("lenght", "Did you mean 'length'"),
        ("./no/such/reward_model", "could not be loaded: model directory './no/such/reward_model' does not exist"),
        ("tiny:nonsense", "could not be loaded: unknown model 'tiny:nonsense'"),
        ("not-a-model-or-source", "unknown reward source 'not-a-model-or-source'"),
    ],
)
def test_bad_specs_raise_one_clear_error(spec, message):
    with pytest.raises(RewardSourceError, match=message) as info:
        build_reward_source(spec)
    assert isinstance(info.value, ValueError)
    text = str(info.value)
    if "could not be loaded" not in text:  # not a model path: the message lists every form
        for form in ("lexicon:vader", "'length'", "function:module:attr", "module:attr", "raylign train reward"):
            assert form in text, (form, text)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="batchsize"):
        build_reward_source("length", batchsize=4)
    # Keywords for other kinds of source are accepted and ignored (one settings dict for a whole mix).
    assert build_reward_source("lexicon:vader", batch_size=4, max_length=64).name == "lexicon:vader"


# ---- weighted mix --------------------------------------------------------------------------------


class Constant(RewardSource):
    def __init__(self, name, values, trainable=False):
        self.name, self.values, self.trainable = name, values, trainable
        self.updates = 0

    def score(self, prompts, completions):
        return np.asarray(self.values[: len(completions)], dtype=np.float32)

    def update(self, prompts, completions, **batch):
        self.updates += 1
        return {"loss": 0.25, "seen": float(len(completions))}


def test_weighted_mix_arithmetic_and_components():
    a, b = Constant("a", [1.0, 2.0, -3.0]), Constant("b", [10.0, 20.0, 0.5])
    mix = WeightedMix([a, b], [0.5, -2.0])
    completions = ["x", "y", "z"]
    total = mix.score(None, completions)
    assert total.dtype == np.float32
    np.testing.assert_allclose(total, [0.5 - 20.0, 1.0 - 40.0, -1.5 - 1.0])
    components = mix.score_components(None, completions)
    assert list(components) == ["a", "b"]
    np.testing.assert_array_equal(components["a"], np.float32([1.0, 2.0, -3.0]))  # unweighted
    total2, components2 = mix.score_with_components(None, completions)
    np.testing.assert_array_equal(total, total2)
    np.testing.assert_array_equal(components2["b"], components["b"])
    assert mix.name == "0.5*a + -2*b"
    assert mix(None, completions).tolist() == total.tolist()


def test_weighted_mix_names_defaults_and_checks():
    vader = build_reward_source("lexicon:vader")
    mix = WeightedMix([vader, build_reward_source("lexicon:vader"), build_reward_source("length")])
    assert mix.weights == [1.0, 1.0, 1.0]
    assert list(mix.score_components(None, ["good"])) == ["lexicon:vader", "lexicon:vader#2", "length"]
    assert mix.score(None, ["good day"])[0] == pytest.approx(2 * vader.score(None, ["good day"])[0] + 2)
    with pytest.raises(ValueError, match="2 reward sources but 1 weights"):
        WeightedMix([vader, vader], [1.0])
    with pytest.raises(RewardSourceError, match="at least one source"):
        WeightedMix([])
    with pytest.raises(RewardSourceError, match="returned 2 scores for 3 completions"):
        WeightedMix([Constant("short", [1.0, 2.0])]).score(None, ["a", "b", "c"])


def test_update_hook_reaches_trainable_sources_only():
    fixed, learner = Constant("fixed", [0.0]), Constant("disc", [0.0], trainable=True)
    assert not fixed.trainable and RewardSource.update(fixed, [None], ["a"]) == {}
    mix = WeightedMix([fixed, learner], [1.0, 0.1])
    assert mix.trainable
    metrics = mix.update([None], ["a"], human_texts=["b"])
    assert metrics == {"disc/loss": 0.25, "disc/seen": 1.0}
    assert learner.updates == 1 and fixed.updates == 0
    assert not WeightedMix([fixed]).trainable


def test_build_reward_from_config(tmp_path, monkeypatch):
    mod = user_module(tmp_path, monkeypatch, """
        def exclaim(prompts, completions):
            return [c.count("!") for c in completions]
    """)
    cfg = RewardConfig.model_validate({"sources": [
        {"source": "lexicon:vader", "weight": 1.0},
        {"source": "length", "weight": -0.1},
        {"source": f"function:{mod}:exclaim", "weight": 0.5},
    ]})
    reward = build_reward(cfg)
    assert isinstance(reward, WeightedMix) and reward.weights == [1.0, -0.1, 0.5]
    texts = ["great!!", "a b c d"]
    parts = reward.score_components(["p", "q"], texts)
    expected = parts["lexicon:vader"] - 0.1 * parts["length"] + 0.5 * parts[f"function:{mod}:exclaim"]
    np.testing.assert_allclose(reward.score(["p", "q"], texts), expected, rtol=1e-6)
    assert parts["length"].tolist() == [1.0, 4.0]
    with pytest.raises(RewardSourceError, match="reward.sources is empty"):
        build_reward(RewardConfig())


# ---- reward model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny:llama scalar model (random score head) saved like `raylign train reward` saves one."""
    from raylign.models import load_scalar_model, save_model

    model, tokenizer = load_scalar_model("tiny:llama")
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("rm") / "final"))


PROMPTS = ["Tell me about the sea.", [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "How do I make tea?"}],
           "What is the capital of France?", None, "Thanks!", "Write a poem."]
COMPLETIONS = ["The sea is wide and blue.", "Boil the water, then wait.", "Paris.",
               "A plain text without a prompt.", "", "The quick brown fox " * 40]


def test_reward_model_scores_shape_determinism_and_batching(reward_model_dir):
    from raylign.rewards.model import RewardModelSource

    one = build_reward_source(reward_model_dir, batch_size=1)
    assert isinstance(one, RewardModelSource) and one.name == f"rm:{reward_model_dir}"
    assert not one.model.training
    assert all(not p.requires_grad for p in one.model.parameters())
    scores = one.score(PROMPTS, COMPLETIONS)
    assert scores.dtype == np.float32 and scores.shape == (len(COMPLETIONS),)
    assert np.isfinite(scores).all() and np.unique(scores).size == len(scores)
    np.testing.assert_array_equal(scores, one.score(PROMPTS, COMPLETIONS))  # deterministic
    four = build_reward_source(reward_model_dir, batch_size=4)  # a second load gives the same model
    np.testing.assert_allclose(four.score(PROMPTS, COMPLETIONS), scores, atol=1e-5, rtol=0)
    # Order-independent: each score depends on its own (prompt, completion) only.
    rev = four.score(PROMPTS[::-1], COMPLETIONS[::-1])[::-1]
    np.testing.assert_allclose(rev, scores, atol=1e-5, rtol=0)


def test_reward_model_sees_chat_template_and_truncates(reward_model_dir):
    from raylign.data import tokenize_example

    source = build_reward_source(reward_model_dir, max_length=40, max_prompt_length=24)
    tokenizer = source.tokenizer
    assert tokenizer.padding_side == "right"
    ids = source.encode("Tell me about the sea.", "It is blue.")
    # Exactly the ids reward training used for this row.
    assert ids == tokenize_example(tokenizer, "Tell me about the sea.", "It is blue.", 24, 40)["input_ids"]
    assert tokenizer.decode(ids) == ("<|im_start|>user\nTell me about the sea.<|im_end|>\n"
                                     "<|im_start|>assistant\nIt is blue.<|im_end|>\n")
    # Long prompts lose their start (first token kept), long completions their end; total <= max_length.
    long_prompt = "Please write a short poem about the sea and the waves. " * 5
    long_ids = source.encode(long_prompt, "The quick brown fox " * 40)
    assert len(long_ids) == 40
    assert tokenizer.decode(long_ids[24:]).startswith("The quick brown fox")
    assert source.score([long_prompt], ["The quick brown fox " * 40]).shape == (1,)
