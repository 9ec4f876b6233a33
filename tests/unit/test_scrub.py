"""`raylign data scrub`: Presidio pattern recognizers (+ a spaCy entity ruler for names) with keyed
pseudonyms, on a Faker-made file with PII planted at known places."""

from __future__ import annotations

import hashlib
import hmac
import json
import random

import numpy as np
import pytest

pytest.importorskip("presidio_analyzer")
faker = pytest.importorskip("faker")
spacy = pytest.importorskip("spacy")

from raylign.cli import main  # noqa: E402
from raylign.data import load_dataset  # noqa: E402
from raylign.data.scrub import (  # noqa: E402
    KEY_ENV,
    PLACEHOLDER,
    Finding,
    Scrubber,
    ScrubError,
    bootstrap_mean_ci,
    normalise,
    pseudonym,
    read_key,
    resolve_overlaps,
    scrub_file,
)

KEY = b"test-key-0123456789abcdef"
PATTERN_TYPES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS")


# ---- pure pieces ---------------------------------------------------------------------------------


def test_pseudonym_is_the_keyed_hmac_of_the_normalised_value():
    expected = hmac.new(KEY, b"EMAIL_ADDRESS\x00ann@example.org", hashlib.sha256).hexdigest()[:8]
    assert pseudonym(KEY, "EMAIL_ADDRESS", "Ann@Example.org") == f"<EMAIL_ADDRESS_{expected}>"
    # Spellings of one value share a pseudonym; another key or another entity gives another one.
    assert pseudonym(KEY, "PHONE_NUMBER", "+1 (415) 555-2671") == pseudonym(KEY, "PHONE_NUMBER", "+1.415.555.2671")
    assert pseudonym(KEY, "IBAN_CODE", "de89 3704 0044 0532 0130 00") == pseudonym(KEY, "IBAN_CODE",
                                                                                    "DE89370400440532013000")
    assert pseudonym(b"another-key-0123456789", "EMAIL_ADDRESS", "ann@example.org") != pseudonym(
        KEY, "EMAIL_ADDRESS", "ann@example.org")
    assert PLACEHOLDER.fullmatch(pseudonym(KEY, "PERSON", "Ann  Lee"))
    assert normalise("PERSON", " Ann \n Lee ") == "ann lee"


def test_bootstrap_mean_ci_hand_case_and_scipy():
    assert bootstrap_mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)  # no spread: the interval is the point
    assert all(np.isnan(bootstrap_mean_ci([])))
    stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(1).normal(size=200)
    lo, hi = bootstrap_mean_ci(x, n_boot=4000)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.02) and hi == pytest.approx(ref.high, abs=0.02)


def test_resolve_overlaps_prefers_score_then_length():
    email, url, phone = Finding("EMAIL_ADDRESS", 0, 20, 1.0), Finding("URL", 5, 20, 0.5), Finding("PHONE_NUMBER", 30, 40, 0.4)
    card, inner = Finding("CREDIT_CARD", 50, 69, 1.0), Finding("PHONE_NUMBER", 50, 60, 0.4)
    assert resolve_overlaps([url, phone, inner, email, card]) == [email, phone, card]
    assert resolve_overlaps([Finding("A", 0, 4, 0.5), Finding("B", 2, 9, 0.5)]) == [Finding("B", 2, 9, 0.5)]


def test_read_key_sources_and_errors(tmp_path):
    path = tmp_path / "k"
    path.write_bytes(KEY + b"\n")
    assert read_key(str(path), environ={}) == (KEY, "--key-file")
    assert read_key(None, environ={KEY_ENV: KEY.decode()}) == (KEY, f"${KEY_ENV}")
    with pytest.raises(ScrubError, match="--key-file PATH or set"):
        read_key(None, environ={})
    with pytest.raises(ScrubError, match="at least 16"):
        read_key(None, environ={KEY_ENV: "short"})
    with pytest.raises(ScrubError, match="not found"):
        read_key(str(tmp_path / "missing"), environ={})


# ---- the Faker file ------------------------------------------------------------------------------


def planted_pairs(n: int = 500, seed: int = 0):
    """n pairs with e-mails, phones, cards, IBANs, IPs and names at known places: (rows, spans,
    names, shared) where spans are (row, field, start, end, entity, value) and `shared` the rows whose
    chosen and rejected quote the same e-mail."""
    fake = faker.Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    makers = {"EMAIL_ADDRESS": fake.email, "PHONE_NUMBER": fake.phone_number, "CREDIT_CARD": fake.credit_card_number,
              "IBAN_CODE": fake.iban, "IP_ADDRESS": fake.ipv4, "PERSON": fake.name}
    lead = {"EMAIL_ADDRESS": "write to", "PHONE_NUMBER": "call", "CREDIT_CARD": "my card is",
            "IBAN_CODE": "pay into", "IP_ADDRESS": "the server is at", "PERSON": "ask"}
    rows, spans, names, shared = [], [], set(), set()
    for i in range(n):
        row = {}
        for field in ("prompt", "chosen", "rejected"):
            text = fake.sentence(nb_words=8)
            for _ in range(rng.randint(0, 2)):
                entity = rng.choice(list(makers))
                value = makers[entity]()
                if entity == "PERSON":
                    names.add(value)
                text += f" Please {lead[entity]} "
                spans.append((i, field, len(text), len(text) + len(value), entity, value))
                text += value + ". " + fake.sentence(nb_words=6)
            row[field] = text
        if i % 10 == 0:  # the same e-mail quoted on both sides
            value = fake.email()
            for field in ("chosen", "rejected"):
                row[field] += " Reply to "
                spans.append((i, field, len(row[field]), len(row[field]) + len(value), "EMAIL_ADDRESS", value))
                row[field] += value + "."
            shared.add(i)
        rows.append(row)
    return rows, spans, sorted(names), shared


def entity_ruler_pipeline(names, path):
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "PERSON", "pattern": name} for name in names])
    nlp.to_disk(path)
    return str(path)


def overlaps(a0, a1, b0, b1):
    return a0 < b1 and b0 < a1


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scrub")
    rows, spans, names, shared = planted_pairs()
    src = tmp / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"tmp": tmp, "rows": rows, "spans": spans, "src": str(src), "shared": shared,
            "spacy": entity_ruler_pipeline(names, tmp / "ruler")}


def test_planted_pii_recall_precision_second_pass_and_consistency(planted, capsys):
    rows, spans = planted["rows"], planted["spans"]
    nlp = spacy.load(planted["spacy"])
    scrubber = Scrubber(KEY, nlp, planted["spacy"])
    found = {(i, f): scrubber.find(rows[i][f]) for i in range(len(rows)) for f in ("prompt", "chosen", "rejected")}
    recall = {}
    for entity in (*PATTERN_TYPES, "PERSON"):
        truth = [s for s in spans if s[4] == entity]
        hits = sum(any(x.entity == entity and x.start <= s0 and x.end >= s1 for x in found[(i, f)])
                   for i, f, s0, s1, _, _ in truth)
        recall[entity] = hits / len(truth)
    assert min(recall.values()) >= 0.95, recall
    findings = [(key, x) for key, xs in found.items() for x in xs]
    true_positive = sum(any(overlaps(x.start, x.end, s0, s1) for i, f, s0, s1, _, _ in spans if (i, f) == key)
                        for key, x in findings)
    precision = true_positive / len(findings)
    with capsys.disabled():  # the figures the README quotes
        print(f"\nrecall {json.dumps({k: round(v, 4) for k, v in recall.items()})}, precision {precision:.4f} "
              f"({len(findings)} findings, {len(spans)} planted)")
    assert precision >= 0.9, precision

    out = planted["tmp"] / "scrubbed.jsonl"
    report = scrub_file(planted["src"], "pairs", str(out), KEY, spacy=planted["spacy"], progress=False,
                        echo=print)
    assert report["second_pass"]["findings"] == 0, report["second_pass"]
    assert report["ner"] and report["rows"] == 500 and 0.5 < report["share_rows_touched"] <= 1.0
    assert set(report["counts"]["all"]["chosen"]) >= {"EMAIL_ADDRESS", "PERSON"}
    assert "SpacyRecognizer" in report["recognizers"]
    asym = report["pair_asymmetry"]
    assert asym["pairs"] == 500 and asym["ci95"][0] <= asym["mean_chosen_minus_rejected"] <= asym["ci95"][1]

    scrubbed = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    text = out.read_text(encoding="utf-8") + json.dumps(report) + "".join(capsys.readouterr())
    planted_values = {v for *_, v in spans}
    leaked = [v for v in planted_values if v in text]
    assert len(leaked) <= 0.05 * len(planted_values), leaked[:5]
    for i in planted["shared"]:  # the same e-mail in chosen and rejected: one pseudonym on both sides
        tail = {f: PLACEHOLDER.findall(scrubbed[i][f])[-1] for f in ("chosen", "rejected")}
        assert tail["chosen"] == tail["rejected"] and tail["chosen"][0] == "EMAIL_ADDRESS"
    load_dataset(str(out), "pairs")  # the scrubbed file is valid pairs data
    assert main(["data", "validate", str(out), "--kind", "pairs"]) == 0


def test_cli_scrub_ner_off_chat_prompts_and_no_span_printed(tmp_path, capsys, monkeypatch):
    secret = "zoe.quinn@example.net"
    src = tmp_path / "u.jsonl"
    src.write_text(json.dumps({"prompt": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": f"mail {secret}, ip 10.2.3.4"}],
                               "completion": f"Done: {secret}", "label": True, "note": f"from {secret}"}) + "\n")
    out, report = tmp_path / "o.jsonl", tmp_path / "r.json"
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert main(["data", "scrub", str(src), "--kind", "unpaired", "--out", str(out)]) == 2
    assert "--key-file" in capsys.readouterr().err and not out.exists()
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    assert main(["data", "scrub", str(src), "--kind", "unpaired", "--out", str(out), "--report", str(report),
                 "--no-progress"]) == 0
    printed = "".join(capsys.readouterr())
    assert "NER OFF" in printed and secret not in printed and "10.2.3.4" not in printed
    row = json.loads(out.read_text())
    assert row["prompt"][0] == {"role": "system", "content": "be brief"}
    assert secret not in json.dumps(row) and row["label"] is True
    mail = pseudonym(KEY, "EMAIL_ADDRESS", secret)
    assert mail in row["prompt"][1]["content"] and mail in row["completion"] and mail in row["note"]
    saved = json.loads(report.read_text())
    assert saved["ner"] is False and "NER OFF" in saved["ner_note"] and KEY.decode() not in report.read_text()
    assert saved["counts"]["all"]["note"] == {"EMAIL_ADDRESS": 1}


def test_bad_rows_write_nothing_and_spacy_is_never_downloaded(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "a@b.io", "chosen": "x", "rejected": "y"}\n{"prompt": "p", "chosen": 3, "rejected": "y"}\n')
    out = tmp_path / "o.jsonl"
    with pytest.raises(Exception, match="field 'chosen'"):
        scrub_file(str(src), "pairs", str(out), KEY, progress=False, echo=lambda _: None)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ScrubError, match="never downloads"):
        scrub_file(str(src), "pairs", str(out), KEY, spacy="en_core_web_nonexistent", progress=False)
    with pytest.raises(ScrubError, match=r"\*\.jsonl"):
        scrub_file(str(src), "pairs", str(tmp_path / "o.csv"), KEY, progress=False)
