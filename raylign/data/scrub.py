"""`raylign data scrub`: find personal data in every text field of a data file and replace each value
by a keyed pseudonym, with a report (extra `raylign[privacy]`: Microsoft Presidio).

Detection. Presidio's pattern recognizers, which need no model: e-mail, phone (`phonenumbers`, any
possible number: a scrubber errs towards recall), credit card (12-19 digits, Luhn-checked), IBAN
(checksum), IP, URL, US SSN and dates (dates of birth among them). Named entities (PERSON,
LOCATION, ORGANIZATION) only when the user gives a spaCy pipeline (`--spacy PATH_OR_PACKAGE`,
loaded with `spacy.load`, never downloaded); without one the run says loudly that names are NOT
removed. Presidio's default engine would fetch `en_core_web_lg`, and its e-mail check fetches the
public suffix list: here the NLP engine is the given pipeline or a blank `spacy.blank("en")`, and the
e-mail check uses tldextract's bundled suffix list, so nothing is downloaded at run time.

Replacement. A value becomes `<ENTITY_xxxxxxxx>`: the first 8 hex digits of
HMAC-SHA256(key, ENTITY ∥ 0x00 ∥ normalised value) (Presidio's anonymizer, one custom operator per
entity). The same value gets the same pseudonym in every field and row (prompt, chosen and rejected
stay consistent), and across files scrubbed with the same key; without the key a pseudonym cannot be
reversed by trying candidate values. 8 hex digits: two distinct values of one entity share a
pseudonym with probability about n²/2³³ (n = 10⁴ distinct values: 1%). The key comes from
`--key-file` or `$RAYLIGN_SCRUB_KEY` and is never written out; no original span is ever printed or
written to the report.

Every text field of every kind is scrubbed (chat prompts message by message), and every other string
column too (ids, metadata), since personal data is not confined to the trained-on fields. Rows are
streamed through `raylign.data.readers` and written atomically (`rundir.write_jsonl_atomic`).

Report: counts per entity per field and split (the `split` column when the file has one, else
`all`), the share of rows touched, the recognizers that ran, a second pass of the same analyzer over
the written file (expected: zero findings outside the pseudonyms), and for pairs the chosen-vs-rejected
redaction asymmetry — mean over pairs of (#pseudonyms in chosen − #pseudonyms in rejected), with a
bootstrap 95% interval: a reward model trained where placeholders fall more on one side learns
"placeholder = bad".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from raylign.data.dataset import read_source
from raylign.data.schema import DataError, ErrorLog, check_kind, check_row, fields_for, missing_columns
from raylign.rundir import write_jsonl_atomic

KEY_ENV = "RAYLIGN_SCRUB_KEY"
MIN_KEY_BYTES = 16
HEX_DIGITS = 8
PATTERN_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL", "US_SSN",
                    "DATE_TIME")
NER_ENTITIES = ("PERSON", "LOCATION", "ORGANIZATION")
PLACEHOLDER = re.compile(r"<([A-Z][A-Z_]*)_([0-9a-f]{" + str(HEX_DIGITS) + "})>")
NER_OFF = ("NER OFF: names, places and organisations are NOT removed (pattern recognizers only); "
           "pass --spacy PATH_OR_PACKAGE (a spaCy pipeline with an NER or entity_ruler component) to remove them")
# Credit cards of any network (Presidio's own pattern misses 2-series Mastercard, JCB, 12-digit
# Maestro, ...): 12-19 digits written as one run, in groups of four, or Amex-style 4-6-5; Presidio's
# recognizer keeps only those passing the Luhn check. Phone-style groups (3-3-4) are not cards.
CARD_PATTERN = (r"(?<![\d-])(?:\d{12,19}|\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?|\d{4}[ -]\d{6}[ -]\d{4,5})"
                r"(?![\d-])")


class ScrubError(DataError):
    """A scrub the user can fix (key, spaCy pipeline, output path); printed as one line."""


# ---- pure pieces -------------------------------------------------------------------------------


def normalise(entity: str, value: str) -> str:
    """The form a value is keyed by, so spellings of one value share a pseudonym: digits only for
    phones, cards and SSNs; IBANs upper-case without spaces; everything else case-folded with runs of
    whitespace made one space."""
    if entity in ("PHONE_NUMBER", "CREDIT_CARD", "US_SSN"):
        digits = re.sub(r"\D", "", value)
        return digits or value
    if entity == "IBAN_CODE":
        return re.sub(r"\s", "", value).upper()
    return " ".join(value.split()).casefold()


def pseudonym(key: bytes, entity: str, value: str) -> str:
    """`<ENTITY_xxxxxxxx>` with xxxxxxxx = hex(HMAC-SHA256(key, ENTITY ∥ 0x00 ∥ normalise(value)))[:8]
    (RFC 2104 HMAC: a keyed pseudonym that cannot be recomputed, hence not reversed, without the key)."""
    digest = hmac.new(key, f"{entity}\x00{normalise(entity, value)}".encode(), hashlib.sha256).hexdigest()
    return f"<{entity}_{digest[:HEX_DIGITS]}>"


def bootstrap_mean_ci(values: Any, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (Efron & Tibshirani 1993, §13.3): resample the n values
    with replacement n_boot times, take the (1−level)/2 and (1+level)/2 quantiles of the resampled
    means. NaNs when there are no values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # [n_boot]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def resolve_overlaps(findings: list[Finding]) -> list[Finding]:
    """Non-overlapping findings, preferring the higher score, then the longer span (a URL inside an
    e-mail address, a phone-shaped run inside a card number give way); in text order."""
    kept: list[Finding] = []
    for f in sorted(findings, key=lambda f: (-f.score, -(f.end - f.start), f.start)):
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def placeholder_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in PLACEHOLDER.finditer(text)]


def read_key(key_file: str | None = None, environ: dict[str, str] | None = None) -> tuple[bytes, str]:
    """The HMAC key and where it came from: `--key-file` (its bytes, one trailing newline dropped), else
    $RAYLIGN_SCRUB_KEY. At least 16 bytes."""
    env = os.environ if environ is None else environ
    if key_file:
        path = Path(key_file).expanduser()
        if not path.is_file():
            raise ScrubError(f"--key-file {key_file}: file not found")
        key, source = path.read_bytes().removesuffix(b"\n").removesuffix(b"\r"), "--key-file"
    elif env.get(KEY_ENV):
        key, source = env[KEY_ENV].encode(), f"${KEY_ENV}"
    else:
        raise ScrubError(f"scrubbing needs a secret key for the pseudonyms: pass --key-file PATH or set ${KEY_ENV} "
                         f"(e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > scrub.key`); "
                         "keep it to scrub later files consistently")
    if len(key) < MIN_KEY_BYTES:
        raise ScrubError(f"the scrub key from {source} has {len(key)} bytes; use at least {MIN_KEY_BYTES}")
    return key, source


# ---- the analyzer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    entity: str
    start: int
    end: int
    score: float


def _require_presidio() -> None:
    try:
        import presidio_analyzer  # noqa: F401
        import presidio_anonymizer  # noqa: F401
    except ImportError:
        raise ScrubError("raylign data scrub needs Microsoft Presidio: pip install 'raylign[privacy]' "
                         "(presidio-analyzer, presidio-anonymizer)") from None


def load_spacy(spec: str) -> Any:
    """A spaCy pipeline from a directory (`nlp.to_disk`) or an installed package; never downloaded."""
    import spacy

    try:
        nlp = spacy.load(spec)
    except OSError:
        raise ScrubError(f"--spacy {spec}: not a spaCy pipeline directory nor an installed spaCy package; "
                         "install one with pip (e.g. the en_core_web_sm wheel) or save one with nlp.to_disk(PATH). "
                         "raylign never downloads models") from None
    return nlp


class Scrubber:
    """Presidio analyzer + anonymizer with keyed pseudonyms; `scrub(text)` -> (text, entities replaced)."""

    def __init__(self, key: bytes, spacy_pipeline: Any = None, spacy_name: str | None = None):
        _require_presidio()
        import spacy
        import tldextract
        from presidio_analyzer import AnalyzerEngine, Pattern, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            DateRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            PhoneRecognizer,
            SpacyRecognizer,
            UrlRecognizer,
            UsSsnRecognizer,
        )
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig

        offline_suffixes = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

        class OfflineEmailRecognizer(EmailRecognizer):
            """Presidio's e-mail recognizer with its domain check on tldextract's bundled suffix list."""

            def validate_result(self, pattern_text: str) -> bool:
                return offline_suffixes(pattern_text).fqdn != ""

        class ProvidedSpacyEngine(SpacyNlpEngine):
            """Presidio's spaCy engine around a pipeline already in memory (its `load` would download)."""

            def __init__(self, nlp: Any):
                config = NerModelConfiguration(labels_to_ignore=["DATE", "TIME", "NORP", "CARDINAL", "ORDINAL",
                                                                 "MONEY", "PERCENT", "QUANTITY"])
                super().__init__(models=[{"lang_code": "en", "model_name": "provided"}],
                                 ner_model_configuration=config)
                self.nlp = {"en": nlp}  # type: ignore[assignment]  # Presidio types it None until load()

        self.key = key
        self.ner = spacy_pipeline is not None
        self.spacy_name = spacy_name
        recognizers: list[Any] = [
            OfflineEmailRecognizer(), PhoneRecognizer(leniency=0),
            CreditCardRecognizer(patterns=[Pattern("card (12-19 digits, Luhn)", CARD_PATTERN, 0.3)]),
            IbanRecognizer(), IpRecognizer(), UrlRecognizer(), UsSsnRecognizer(), DateRecognizer(),
        ]
        if self.ner:
            recognizers.append(SpacyRecognizer(supported_entities=list(NER_ENTITIES)))
        registry = RecognizerRegistry(supported_languages=["en"])
        for recognizer in recognizers:
            registry.add_recognizer(recognizer)
        self.recognizers = [r.name for r in recognizers]
        self.entities = list(PATTERN_ENTITIES) + (list(NER_ENTITIES) if self.ner else [])
        nlp = spacy_pipeline if self.ner else spacy.blank("en")
        self.analyzer = AnalyzerEngine(registry=registry, nlp_engine=ProvidedSpacyEngine(nlp),
                                       supported_languages=["en"])
        self.anonymizer = AnonymizerEngine()
        self.operators = {e: OperatorConfig("custom", {"lambda": self._operator(e)}) for e in self.entities}

    def _operator(self, entity: str) -> Callable[[str], str]:
        return lambda value: pseudonym(self.key, entity, value)

    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings in `text`, leaving out any inside a pseudonym already there."""
        if not text.strip():
            return []
        results = self.analyzer.analyze(text, language="en", entities=self.entities)
        taken = placeholder_spans(text)
        found = [Finding(r.entity_type, r.start, r.end, r.score) for r in results
                 if not any(s <= r.start and r.end <= e for s, e in taken)]
        return resolve_overlaps(found)

    def scrub(self, text: str) -> tuple[str, list[str]]:
        """The text with every finding replaced by its pseudonym, and the entities replaced."""
        from presidio_anonymizer.entities import RecognizerResult

        findings = self.find(text)
        if not findings:
            return text, []
        results = [RecognizerResult(f.entity, f.start, f.end, f.score) for f in findings]
        out = self.anonymizer.anonymize(text, results, operators=self.operators)
        return out.text, [item.entity_type for item in out.items]


# ---- files -------------------------------------------------------------------------------------


def _texts(value: Any) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every string inside a value (chat messages: the content only)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str):
                yield value, i
            else:
                yield from _texts(item)
    elif isinstance(value, dict):
        for k, item in value.items():
            if isinstance(item, str):
                if k != "role":
                    yield value, k
            else:
                yield from _texts(item)


def scrub_value(value: Any, fn: Callable[[str], tuple[str, list[str]]]) -> tuple[Any, list[str]]:
    """A field's value with every string in it scrubbed by `fn`; the entities replaced."""
    if isinstance(value, str):
        return fn(value)
    entities: list[str] = []
    for container, k in list(_texts(value)):
        container[k], found = fn(container[k])
        entities.extend(found)
    return value, entities


def checked_rows(path: str, kind: str, log: ErrorLog) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of every good row, the kind's fields normalised; problems go to `log`."""
    reading, _ = read_source(path)
    fields: dict[str, str] | None = None
    seen: dict[str, None] = {}
    for batch in reading.batches:
        log.extend(batch.errors)
        seen.update(dict.fromkeys(batch.columns))
        if fields is None and seen:
            fields = fields_for(kind, list(seen))
        if fields is None:
            continue
        if batch.table is not None:
            records = [(f"{reading.source}: row {batch.first_row + i}", batch.first_row + i, v)
                       for i, v in enumerate(batch.table.to_pylist())]
        else:
            records = [(r.where, r.pos, r.values) for r in batch.records]
        for where, pos, values in records:
            row, problems = check_row(values, fields, not reading.typed)
            for name, message in problems:
                if message == "missing":
                    log.add_missing(name, pos, where)
                else:
                    log.add(pos, where, f"field '{name}': {message}")
            if not log:
                yield where, row
    missing = missing_columns(kind, list(seen)) if seen else []
    if missing:
        log.drop_missing(missing)
        log.add(-1, reading.source, f"missing column(s) {', '.join(missing)} for kind '{kind}'")
    if not seen and not log:
        log.add(-1, reading.source, "no rows")


def _count_placeholders(value: Any) -> int:
    if isinstance(value, str):
        return len(PLACEHOLDER.findall(value))
    return sum(len(PLACEHOLDER.findall(c[k])) for c, k in _texts(value))


def scrub_file(path: str, kind: str, out: str, key: bytes, spacy: str | None = None,
               report: str | None = None, key_source: str = "", progress: bool = True,
               echo: Callable[[str], None] = print, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Scrub every string of every row of `path` into `out` (JSONL, atomic), second-pass it, and write
    the report (JSON) to `report` (default: OUT with `.report.json`). Returns the report."""
    check_kind(kind)
    out_path = Path(out)
    if out_path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise ScrubError(f"--out {out}: the scrubbed file is written as JSON lines; name it *.jsonl")
    if Path(path).exists() and out_path.exists() and out_path.resolve() == Path(path).resolve():
        raise ScrubError("--out is the input file; write the scrubbed copy elsewhere (the input is kept)")
    report_path = Path(report) if report else out_path.with_name(out_path.stem + ".report.json")
    nlp = load_spacy(spacy) if spacy else None
    scrubber = Scrubber(key, nlp, spacy)
    if not scrubber.ner:
        echo(f"WARNING: {NER_OFF}")

    counts: dict[str, dict[str, Counter[str]]] = {}
    state = {"rows": 0, "touched": 0}
    gaps: list[int] = []
    log = ErrorLog(path)
    bar = tqdm(desc="scrubbing", unit="row", disable=not progress)

    def scrubbed() -> Iterator[dict[str, Any]]:
        for _, row in checked_rows(path, kind, log):
            split = str(row.get("split") or "all")
            touched = False
            for name in list(row):
                if row[name] is None:
                    continue
                row[name], entities = scrub_value(row[name], scrubber.scrub)
                if entities:
                    touched = True
                    counts.setdefault(split, {}).setdefault(name, Counter()).update(entities)
            if kind == "pairs":
                gaps.append(_count_placeholders(row["chosen"]) - _count_placeholders(row["rejected"]))
            state["rows"] += 1
            state["touched"] += touched
            bar.update()
            yield row
        log.raise_if_any()  # a bad row: nothing is written (write_jsonl_atomic drops its temp file)

    try:
        write_jsonl_atomic(scrubbed(), out_path)
    finally:
        bar.close()
    second = second_pass(str(out_path), kind, scrubber, progress)
    totals: Counter[str] = Counter()
    for fields in counts.values():
        for c in fields.values():
            totals.update(c)
    result: dict[str, Any] = {
        "input": path, "output": str(out_path), "kind": kind, "rows": state["rows"],
        "rows_touched": state["touched"], "share_rows_touched": state["touched"] / max(state["rows"], 1),
        "ner": scrubber.ner, "spacy": spacy, "ner_note": None if scrubber.ner else NER_OFF,
        "recognizers": scrubber.recognizers, "entities": scrubber.entities,
        "counts": {s: {f: dict(sorted(c.items())) for f, c in fields.items()} for s, fields in counts.items()},
        "totals": dict(sorted(totals.items())),
        "second_pass": second,
        "pseudonyms": {"scheme": f"HMAC-SHA256, first {HEX_DIGITS} hex digits", "key_source": key_source},
    }
    if kind == "pairs":
        result["pair_asymmetry"] = pair_asymmetry(gaps, n_boot, seed)
    write_json_atomic(result, report_path)
    result["report"] = str(report_path)
    return result


def pair_asymmetry(gaps: list[int], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per pair d = #pseudonyms(chosen) − #pseudonyms(rejected): mean d with a bootstrap 95% interval
    and the share of pairs where each side has more (0 and an interval around 0: no asymmetry)."""
    d = np.asarray(gaps, dtype=np.float64)
    lo, hi = bootstrap_mean_ci(d, n_boot, seed)
    n = max(len(d), 1)
    return {"mean_chosen_minus_rejected": float(d.mean()) if len(d) else float("nan"), "ci95": [lo, hi],
            "share_chosen_more": float((d > 0).sum() / n), "share_rejected_more": float((d < 0).sum() / n),
            "pairs": len(d)}


def second_pass(path: str, kind: str, scrubber: Scrubber, progress: bool = True) -> dict[str, Any]:
    """The analyzer over the written file: findings outside pseudonyms (expected 0), by entity, with
    where they are (file:line and field, never the text)."""
    by_entity: Counter[str] = Counter()
    where: list[str] = []
    log = ErrorLog(path)
    for loc, row in tqdm(checked_rows(path, kind, log), desc="second pass", unit="row", disable=not progress):
        for name, value in row.items():
            texts = [value] if isinstance(value, str) else [c[k] for c, k in _texts(value)] if value else []
            for text in texts:
                for f in scrubber.find(text):
                    by_entity[f.entity] += 1
                    if len(where) < 20:
                        where.append(f"{loc} field '{name}': {f.entity}")
    log.raise_if_any()
    return {"findings": sum(by_entity.values()), "by_entity": dict(by_entity), "where": where}


def write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def format_report(report: dict[str, Any]) -> list[str]:
    """Console lines: counts only, never a span."""
    lines = [f"scrubbed {report['rows']} rows -> {report['output']} "
             f"({report['rows_touched']} touched, {report['share_rows_touched']:.1%})"]
    if not report["ner"]:
        lines.append(f"WARNING: {NER_OFF}")
    totals = ", ".join(f"{e} {n}" for e, n in report["totals"].items()) or "none"
    lines.append(f"replaced: {totals}")
    lines.append(f"recognizers: {', '.join(report['recognizers'])}")
    sp = report["second_pass"]
    lines.append(f"second pass on the output: {sp['findings']} finding(s)"
                 + (f" ({', '.join(f'{e} {n}' for e, n in sp['by_entity'].items())})" if sp["findings"] else ""))
    if "pair_asymmetry" in report:
        a = report["pair_asymmetry"]
        lines.append(f"chosen-vs-rejected pseudonyms per pair: {a['mean_chosen_minus_rejected']:+.3f} "
                     f"[{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}]")
    lines.append(f"report: {report['report']}")
    return lines


def run_scrub_command(args: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    key, source = read_key(args.key_file)
    report = scrub_file(args.file, args.kind, args.out, key, spacy=args.spacy, report=args.report,
                        key_source=source, progress=not args.no_progress, echo=echo)
    for line in format_report(report):
        echo(line)
    return report
