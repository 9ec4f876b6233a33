"""`annotate report` statistics against reference implementations, and the simulated annotators' noise."""

from __future__ import annotations

import json
from collections import Counter

import krippendorff
import numpy as np
import pytest
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

from raylign.annotation.cli import main
from raylign.annotation.report import CHOICE_CATEGORIES, build_report, choice_triples
from raylign.annotation.simulate import Oracle, oracle_rating, simulated_judgment
from raylign.annotation.store import Store
from raylign.annotation.tasks import Task, TaskItem, TaskSettings
from raylign.evaluation.agreement import judgments_from_triples


def _store(tmp_path, n_items=60, n_annotators=4, missing=0.25, seed=0) -> Store:
    """Random judgments that mostly follow a hidden truth, some items not judged by everyone."""
    gen = np.random.default_rng(seed)
    store = Store(tmp_path / "db.sqlite")
    items = [TaskItem(item_id=f"i{i}", kind="human-vs-model" if i % 5 == 0 else "pairwise", prompt="p",
                      response_a="x", response_b="y", source_a="human" if i % 5 == 0 else None,
                      source_b="model" if i % 5 == 0 else None, gold="a" if i == 1 else None)
             for i in range(n_items)]
    items.append(TaskItem(item_id="r0", kind="rating", prompt="p", response_a="t", criteria=["helpful"]))
    items.append(TaskItem(item_id="r1", kind="rating", prompt="p", response_a="u", criteria=["helpful"]))
    store.load_task(Task(TaskSettings(overlap=n_annotators), items, "t"))
    annotators = [store.add_annotator(f"ann{k}")[0] for k in range(n_annotators)]
    truth = gen.choice(["a", "b", "tie"], size=n_items, p=[0.45, 0.4, 0.15])
    for i in range(n_items):
        for k, ann in enumerate(annotators):
            if k >= 2 and gen.random() < missing:
                continue
            choice = truth[i] if gen.random() < 0.7 else gen.choice(["a", "b", "tie", "skip"])
            store.record(ann, f"i{i}", choice=str(choice))
    for k, ann in enumerate(annotators):
        store.record(ann, "r0", ratings={"helpful": 6 - (k % 2)})
        store.record(ann, "r1", ratings={"helpful": 2 + (k % 2)})
    return store


def test_alpha_and_kappa_equal_the_reference_packages(tmp_path):
    store = _store(tmp_path)
    stats = build_report(store, n_boot=200)["choices"]
    triples = choice_triples(store.current_judgments(), {s.item_id for s in store.items() if s.item.kind != "rating"})
    data = judgments_from_triples(triples, categories=CHOICE_CATEGORIES)
    assert np.isnan(data.matrix).any()  # some items lack some annotators
    reference = krippendorff.alpha(reliability_data=data.matrix, level_of_measurement="nominal")
    assert stats["krippendorff_alpha"] == pytest.approx(reference, abs=1e-6)
    ordinal = krippendorff.alpha(reliability_data=data.matrix, level_of_measurement="ordinal")
    assert stats["krippendorff_alpha_ordinal"] == pytest.approx(ordinal, abs=1e-6)
    lo, hi = stats["krippendorff_alpha_ci"]
    assert lo < stats["krippendorff_alpha"] < hi
    # Fleiss' κ on the items every annotator judged equals statsmodels'
    full = data.matrix[:, ~np.isnan(data.matrix).any(axis=0)]
    complete = [(a, i, CHOICE_CATEGORIES[int(full[a, i])]) for a in range(full.shape[0]) for i in range(full.shape[1])]
    sub = judgments_from_triples(complete, categories=CHOICE_CATEGORIES)
    from raylign.evaluation.agreement import fleiss_kappa as ours

    table, _ = aggregate_raters(full.T.astype(int), n_cat=3)
    assert ours(sub, n_boot=0)["kappa"] == pytest.approx(fleiss_kappa(table, method="fleiss"), abs=1e-9)
    assert stats["votes"]["skip"] > 0 and stats["n_judgments"] == len(triples)
    assert 0 <= stats["position_bias"]["left_share"] <= 1
    assert stats["human_consistency"]["n"] > 0 and 0 <= stats["human_consistency"]["score"] <= 1
    gold_rows = [r for r in stats["annotators"] if r["n_gold"]]
    assert gold_rows and all(r["gold_accuracy"] in (0.0, 1.0) for r in gold_rows)


def test_report_files_and_json(tmp_path, capsys):
    store = _store(tmp_path)
    out = tmp_path / "report"
    assert main(["report", str(store.path), "--out", str(out), "--json", "--bootstrap", "100"]) == 0
    printed = json.loads(capsys.readouterr().out)
    choices = printed["choices"]
    assert isinstance(choices["krippendorff_alpha"], float) and isinstance(choices["fleiss_kappa"], float)
    assert printed["ratings"]["helpful"]["n_judgments"] == 8
    assert printed["ratings"]["helpful"]["krippendorff_alpha_interval"] > 0.5
    assert (out / "report.md").read_text().startswith("# Annotation report")
    for png in ("choices.png", "ratings.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text()) == printed
    text = (out / "report.md").read_text()
    assert "Krippendorff's α (nominal)" in text and "![choices.png](choices.png)" in text
    empty = Store(tmp_path / "empty.sqlite")
    empty.load_task(Task(TaskSettings(), [TaskItem(item_id="x", kind="pairwise", prompt="p", response_a="a",
                                                   response_b="b")], "t"))
    assert main(["report", str(tmp_path / "empty.sqlite"), "--out", str(tmp_path / "r2")]) == 2
    assert "no judgments yet" in capsys.readouterr().err


def test_noise_replaces_answers_uniformly():
    item = {"item_id": "x", "kind": "pairwise"}
    assert all(simulated_judgment({**item, "item_id": f"i{k}"}, "a", 0.0, 0, 1)["choice"] == "a" for k in range(200))
    draws = Counter(simulated_judgment({**item, "item_id": f"i{k}"}, "a", 1.0, 0, 1)["choice"] for k in range(3000))
    assert set(draws) == {"a", "b", "tie"} and all(900 < v < 1100 for v in draws.values())
    # noise ε: the answer differs from the truth with probability ε (K − 1) / K
    changed = sum(simulated_judgment({**item, "item_id": f"i{k}"}, "b", 0.3, 5, 2)["choice"] != "b" for k in range(4000))
    assert abs(changed / 4000 - 0.3 * 2 / 3) < 0.03
    # the same seed, annotator and item draw the same; another annotator draws independently
    same = [simulated_judgment({**item, "item_id": f"i{k}"}, "a", 0.5, 0, 1)["choice"] for k in range(50)]
    assert same == [simulated_judgment({**item, "item_id": f"i{k}"}, "a", 0.5, 0, 1)["choice"] for k in range(50)]
    assert same != [simulated_judgment({**item, "item_id": f"i{k}"}, "a", 0.5, 0, 2)["choice"] for k in range(50)]
    rating = simulated_judgment({"item_id": "r", "kind": "rating", "criteria": ["c1", "c2"]}, {"c1": 6, "c2": 2}, 0.0, 0, 1)
    assert rating == {"item_id": "r", "ratings": {"c1": 6, "c2": 2}}


def test_the_oracle_prefers_the_higher_score():
    oracle = Oracle("lexicon:vader")
    item = {"item_id": "o", "kind": "pairwise", "prompt": "Tell me about dinner.",
            "response_a": "Dinner was awful and sad.", "response_b": "Dinner was lovely!"}
    assert oracle.truth(item) == "b"
    assert oracle.truth({**item, "item_id": "t", "response_b": "Dinner was awful and sad."}) == "tie"
    assert oracle_rating(1.0) == 6 and oracle_rating(-5.0) == 1 and oracle_rating(0.0) == 4


def test_identification_strength_per_item_and_time_by_hand(tmp_path):
    """Three human-vs-model items (the person wrote a on h0, h1; b on h2), two annotators:
    written_by right 3 times of 4 answers -> accuracy 0.75; P_i: h0 both a -> 1, h1 a vs b -> 0, h2 both tie -> 1;
    signed strengths (a2, a2), (a1, b3), (0, 0); latencies 1..6 s."""
    store = Store(tmp_path / "db.sqlite")
    items = [TaskItem(item_id=f"h{i}", kind="human-vs-model", prompt="p", response_a=f"x{i}", response_b=f"y{i}",
                      source_a="human" if i < 2 else "m", source_b="m" if i < 2 else "human") for i in range(3)]
    store.load_task(Task(TaskSettings(overlap=2), items, "t"))
    u, v = (store.add_annotator(n)[0] for n in ("u", "v"))
    store.record(u, "h0", choice="a", strength=2, written_by="a", latency_ms=1000)
    store.record(v, "h0", choice="a", strength=2, written_by="b", latency_ms=2000)
    store.record(u, "h1", choice="a", strength=1, written_by="a", latency_ms=3000)
    store.record(v, "h1", choice="b", strength=3, latency_ms=4000)
    store.record(u, "h2", choice="tie", written_by="b", latency_ms=5000)
    store.record(v, "h2", choice="tie", latency_ms=6000)
    report = build_report(store, n_boot=200)
    ch = report["choices"]
    ident = ch["identification"]
    assert ident["accuracy"] == pytest.approx(0.75) and ident["n_judgments"] == 4
    assert ident["ci_low"] <= 0.75 <= ident["ci_high"]
    # model preferred or tie: h0 human, human; h1 human, model; h2 tie, tie -> 3 / 6
    assert ch["human_consistency"]["score"] == pytest.approx(0.5)
    pi = ch["per_item"]
    assert [r["item_id"] for r in pi["items"]] == ["h1", "h0", "h2"]
    assert [r["agreement"] for r in pi["items"]] == [0.0, 1.0, 1.0]
    assert pi["mean"] == pytest.approx(2 / 3) and pi["unanimous_share"] == pytest.approx(2 / 3)
    signed = np.array([[-2, -1, 0], [-2, 3, 0]], dtype=float)
    reference = krippendorff.alpha(reliability_data=signed, level_of_measurement="ordinal",
                                   value_domain=[-3, -2, -1, 0, 1, 2, 3])
    assert ch["strength"]["krippendorff_alpha_ordinal"] == pytest.approx(reference, abs=1e-6)
    t = report["time"]
    assert t["overall"]["median_s"] == pytest.approx(3.5) and t["overall"]["mean_s"] == pytest.approx(3.5)
    assert t["overall"]["p90_s"] == pytest.approx(np.quantile([1, 2, 3, 4, 5, 6], 0.9))
    assert t["annotators"]["u"]["median_s"] == pytest.approx(3.0) and t["annotators"]["v"]["n"] == 3
    out = tmp_path / "report"
    assert main(["report", str(store.path), "--out", str(out), "--bootstrap", "100"]) == 0
    text = (out / "report.md").read_text()
    assert "identification accuracy" in text and "| h1 | 2 | a | 0.500 | 0.000 |" in text
    assert "## Time per item" in text and "Median 3.5 s" in text


def test_simulated_annotators_name_the_oracles_favourite_as_written_by_a_person():
    item = {"item_id": "h", "kind": "human-vs-model", "prompt": "p", "response_a": "x", "response_b": "y"}
    bodies = [simulated_judgment(item, "b", 0.0, seed=0, annotator=k) for k in range(1, 6)]
    assert all(b["written_by"] == "b" and b["choice"] == "b" for b in bodies)
    noisy_bodies = [simulated_judgment({**item, "item_id": f"h{i}"}, "a", 1.0, seed=0, annotator=1) for i in range(400)]
    share = Counter(b["written_by"] for b in noisy_bodies)["a"] / 400
    assert 0.42 < share < 0.58  # noise 1: a uniform guess
    pair = {**item, "kind": "pairwise"}
    assert "written_by" not in simulated_judgment(pair, "a", 0.0, seed=0, annotator=1)
