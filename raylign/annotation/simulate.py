"""`raylign annotate simulate`: simulated annotators who judge through the same HTTP API as people.

Each simulated annotator gets an annotator row and a token of its own (`<prefix>-1`, `<prefix>-2`, ...),
then asks `GET /api/next` and posts `POST /api/judgments` until its queue is empty, all annotators
at once (one thread each).

The oracle is any reward source spec (`lexicon:vader`, `length`, `module:function`, a reward model;
see `raylign.rewards`). Its true answer for a pair item is the answer it scores higher ("a" or "b"),
"tie" when both score the same; for a rating item, every criterion gets
clip(round(4 + 3 tanh(score)), 1, 7). Asked which answer of a human-vs-model item a person wrote, a
simulated annotator names the answer the oracle scores higher (a drawn one on a tie), with the same
noise over the two answers: how well that identifies the person is how much better people write by
the oracle's measure.

Noise. With probability `noise` (ε) an annotator's answer is replaced by one drawn uniformly from all
K answers, the true one included: K = 3 (a, b, tie) for pair items, K = 7 (1..7) for each rating.
So an annotator gives the true answer with probability 1 − ε + ε/K, and two annotators of one item
err independently. This is the model of `raylign.evaluation.agreement.implied_alpha(noise,
true_distribution)`, whose value for the oracle's answer shares (a, tie, b) over the pair items is in
the summary (`implied_alpha`): what Krippendorff's α of these judgments tends to with many items.
Draws come from `rng(seed, Purpose.ANNOTATE, step=SIMULATE_STEP + annotator number, index=item key)`,
the item key being the first 8 bytes of sha256(item_id): the same seed gives the same judgments
whatever the threads' timing.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from raylign.annotation.errors import AnnotationError
from raylign.annotation.report import CHOICE_CATEGORIES
from raylign.annotation.store import Store
from raylign.annotation.tasks import LIKERT_MAX, LIKERT_MIN, PAIR_KINDS
from raylign.runtime import Purpose, rng

SIMULATE_STEP = 1 << 48  # above every annotator id, which the queue order uses as its step
PAIR_ANSWERS = ("a", "b", "tie")
RETRIES = 4


def item_key(item_id: str) -> int:
    """A stable integer for an item id (never Python's salted `hash`)."""
    return int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "big")


def oracle_rating(score: float) -> int:
    return int(min(LIKERT_MAX, max(LIKERT_MIN, round(4 + 3 * math.tanh(score)))))


def noisy(true: Any, choices: tuple[Any, ...], noise: float, u: float, pick: int) -> Any:
    """`true`, or with probability `noise` (u < noise) the uniformly drawn choices[pick]."""
    return choices[pick % len(choices)] if u < noise else true


class Oracle:
    """A reward source deciding items; thread-safe and cached per item."""

    def __init__(self, spec: str):
        from raylign.rewards import build_reward_source

        self.source = build_reward_source(spec)
        self.name = self.source.name
        self._lock = threading.Lock()
        self._cache: dict[str, Any] = {}

    def truth(self, item: dict[str, Any]) -> Any:
        """"a" | "b" | "tie" for a pair item, {criterion: 1..7} for a rating item."""
        key = item["item_id"]
        with self._lock:
            if key not in self._cache:
                prompt = item.get("prompt")
                if item["kind"] in PAIR_KINDS:
                    sa, sb = (float(s) for s in self.source.score([prompt, prompt], [item["response_a"], item["response_b"]]))
                    self._cache[key] = "a" if sa > sb else "b" if sb > sa else "tie"
                else:
                    (s,) = self.source.score([prompt], [item["response_a"]])
                    self._cache[key] = {c: oracle_rating(float(s)) for c in item["criteria"] or []}
            return self._cache[key]


def simulated_judgment(item: dict[str, Any], truth: Any, noise: float, seed: int, annotator: int) -> dict[str, Any]:
    """The body one simulated annotator posts for one item (module docstring)."""
    g = rng(seed, Purpose.ANNOTATE, step=SIMULATE_STEP + annotator, index=item_key(item["item_id"]))
    if item["kind"] in PAIR_KINDS:
        u, pick = g.random(), int(g.integers(len(PAIR_ANSWERS)))
        body = {"item_id": item["item_id"], "choice": noisy(truth, PAIR_ANSWERS, noise, u, pick)}
        if item["kind"] == "human-vs-model":  # drawn after the choice, so the choices stay as they were
            u, pick = g.random(), int(g.integers(2))
            guess = truth if truth in ("a", "b") else ("a", "b")[pick]
            body["written_by"] = noisy(guess, ("a", "b"), noise, u, pick)
        return body
    scale = tuple(range(LIKERT_MIN, LIKERT_MAX + 1))
    ratings = {}
    for c in item["criteria"] or []:
        u, pick = g.random(), int(g.integers(len(scale)))
        ratings[c] = noisy(truth[c], scale, noise, u, pick)
    return {"item_id": item["item_id"], "ratings": ratings}


def _request(send: Callable[[], Any], what: str, url: str) -> Any:
    import httpx

    for attempt in range(RETRIES):
        try:
            return send()
        except httpx.TransportError as exc:
            if attempt == RETRIES - 1:
                raise AnnotationError(f"the annotation server at {url} stopped answering ({what}: {exc}); judgments "
                                      "posted so far are stored, rerunning with new --prefix adds new annotators") from None
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _annotate(url: str, token: str, number: int, oracle: Oracle, noise: float, seed: int,
              timeout: float) -> tuple[int, Counter[str]]:
    import httpx

    answers: Counter[str] = Counter()
    posted = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as client:
        while True:
            r = _request(lambda: client.get("/api/next"), "GET /api/next", url)
            if r.status_code == 204:
                return posted, answers
            if r.status_code != 200:
                raise AnnotationError(f"GET {url}/api/next answered {r.status_code}: {r.text[:300]}")
            item = r.json()
            body = simulated_judgment(item, oracle.truth(item), noise, seed, number)
            body["idempotency_key"] = "sim-" + hashlib.sha256(f"{seed}:{number}:{item['item_id']}".encode()).hexdigest()[:40]
            r = _request(functools.partial(client.post, "/api/judgments", json=body), "POST /api/judgments", url)
            if r.status_code != 201:
                raise AnnotationError(f"POST {url}/api/judgments answered {r.status_code}: {r.text[:300]}")
            posted += 1
            answers[str(body.get("choice", "rated"))] += 1


def simulate(store: Store, url: str, annotators: int = 5, noise: float = 0.2, oracle: str = "lexicon:vader",
             seed: int = 0, prefix: str = "sim", timeout: float = 30.0) -> dict[str, Any]:
    """Create `annotators` simulated annotators and let them judge their queues through `url`."""
    import httpx

    from raylign.evaluation.agreement import implied_alpha

    if annotators < 1:
        raise AnnotationError(f"--annotators must be at least 1, got {annotators}")
    if not 0.0 <= noise <= 1.0:
        raise AnnotationError(f"--noise is a probability in [0, 1], got {noise}")
    url = url.rstrip("/")
    try:
        health = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise AnnotationError(f"no annotation server answers at {url} ({exc}); start one with `raylign annotate serve "
                              f"TASK.jsonl --db {store.path}`") from None
    if health.status_code != 200:
        raise AnnotationError(f"{url}/health answered {health.status_code}: is that a raylign annotation server?")
    store.require_settings()
    judge = Oracle(oracle)
    existing = {a.name for a in store.annotators()}
    names = [f"{prefix}-{i + 1}" for i in range(annotators)]
    taken = [n for n in names if n in existing]
    if taken:
        raise AnnotationError(f"annotators {', '.join(taken)} already exist in {store.path}; pick another --prefix")
    tokens = [store.add_annotator(n)[1] for n in names]
    started = time.perf_counter()
    with ThreadPoolExecutor(annotators, thread_name_prefix="raylign-simulate") as pool:
        futures = [pool.submit(_annotate, url, tok, i + 1, judge, noise, seed, timeout) for i, tok in enumerate(tokens)]
        results = [f.result() for f in futures]
    seconds = time.perf_counter() - started
    pair_items = [s for s in store.items() if s.item.kind in PAIR_KINDS]
    truths = Counter(judge._cache[s.item_id] for s in pair_items if s.item_id in judge._cache)
    n_true = sum(truths.values())
    distribution = [truths.get(c, 0) / n_true for c in CHOICE_CATEGORIES] if n_true else []
    implied = implied_alpha(noise, distribution) if n_true else None
    if implied is not None and not math.isfinite(implied):
        implied = None  # one true answer everywhere and no noise: α is 0/0
    answers: Counter[str] = Counter()
    for _, a in results:
        answers.update(a)
    return {
        "annotators": names, "judgments": sum(p for p, _ in results), "per_annotator": dict(zip(names, (p for p, _ in results), strict=True)),
        "answers": dict(answers), "oracle": judge.name, "noise": noise, "categories": list(CHOICE_CATEGORIES),
        "true_distribution": distribution, "implied_alpha": implied, "seconds": seconds, "url": url,
    }
