"""`raylign annotate serve` as a real uvicorn subprocess: concurrent posts, kill -9, restart, simulated
annotators through HTTP and their agreement against `implied_alpha` and the `krippendorff` package."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import krippendorff
import pytest

from raylign.annotation.cli import main
from raylign.annotation.report import CHOICE_CATEGORIES, choice_triples, write_report
from raylign.annotation.simulate import simulate
from raylign.annotation.store import Store
from raylign.evaluation.agreement import implied_alpha, judgments_from_triples
from tests.annotation_server import Server, add_annotator, cli, vader_items, write_task

N_ITEMS, N_ANNOTATORS, NOISE = 200, 5, 0.2


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """200 pairwise items, overlap 5, judged by 5 simulated annotators (VADER oracle, noise 0.2) over HTTP."""
    root = tmp_path_factory.mktemp("simulate")
    task = write_task(root / "task.jsonl", vader_items(N_ITEMS), overlap=N_ANNOTATORS, seed=11)
    db = root / "db.sqlite"
    server = Server(task, db).start()
    try:
        summary = simulate(Store(db, create=False), server.url, annotators=N_ANNOTATORS, noise=NOISE,
                           oracle="lexicon:vader", seed=0)
        yield server, db, summary
    finally:
        server.stop()


def test_simulated_annotators_judge_through_the_api(simulated):
    server, db, summary = simulated
    assert summary["judgments"] == N_ITEMS * N_ANNOTATORS
    assert summary["per_annotator"] == {f"sim-{k}": N_ITEMS for k in range(1, N_ANNOTATORS + 1)}
    store = Store(db, create=False)
    rows = store.all_judgments()
    assert len(rows) == N_ITEMS * N_ANNOTATORS and {j.via for j in rows} == {"api"}
    assert len({(j.annotator, j.item_id) for j in rows}) == len(rows)
    # each annotator has its own token: stored hashed, five distinct
    assert len({a.token_sha256 for a in store.annotators()}) == N_ANNOTATORS


def test_alpha_matches_implied_alpha_and_the_krippendorff_package(simulated, tmp_path):
    server, db, summary = simulated
    store = Store(db, create=False)
    report = write_report(store, str(tmp_path / "report"))["report"]
    choices = report["choices"]
    alpha, (lo, hi) = choices["krippendorff_alpha"], choices["krippendorff_alpha_ci"]
    # the oracle's answers over the items, in the categories' order (a, tie, b), give the implied α
    assert summary["categories"] == list(CHOICE_CATEGORIES)
    expected = implied_alpha(NOISE, summary["true_distribution"])
    assert summary["implied_alpha"] == pytest.approx(expected)
    assert 0.45 < expected < 0.7
    assert lo <= expected <= hi, (alpha, lo, hi, expected)
    # the same judgments through the reference implementation
    triples = choice_triples(store.current_judgments(), {s.item_id for s in store.items()})
    data = judgments_from_triples(triples, categories=CHOICE_CATEGORIES)
    assert data.matrix.shape == (N_ANNOTATORS, N_ITEMS)
    reference = krippendorff.alpha(reliability_data=data.matrix, level_of_measurement="nominal")
    assert alpha == pytest.approx(reference, abs=1e-6)
    # report --json: the figures as top-level keys of the choice statistics
    out = cli("report", str(db), "--out", str(tmp_path / "r2"), "--json", "--bootstrap", "200")
    printed = json.loads(out.stdout)
    assert printed["choices"]["krippendorff_alpha"] == pytest.approx(reference, abs=1e-6)
    assert printed["choices"]["fleiss_kappa"] == pytest.approx(choices["fleiss_kappa"])
    assert 0.4 < printed["choices"]["position_bias"]["left_share"] < 0.6  # sides were randomised


def test_simulate_errors_are_one_line(simulated, capsys):
    server, db, _ = simulated
    assert main(["simulate", str(db), "--url", server.url, "--annotators", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sim-1 already exist" in err and "--prefix" in err
    assert main(["simulate", str(db), "--url", server.url, "--oracle", "lexicon:nope", "--prefix", "x"]) == 2
    assert "unknown lexicon" in capsys.readouterr().err
    assert main(["simulate", str(db), "--url", "http://127.0.0.1:9", "--prefix", "y"]) == 2
    assert "no annotation server answers at http://127.0.0.1:9" in capsys.readouterr().err


def _post_all(url: str, posts: list[tuple[str, dict]], acked: list, stop_after: int | None,
              kill: threading.Event) -> None:
    """Post every (token, body) at once, one thread each; record (key, body) of each 201."""
    lock = threading.Lock()
    client = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=len(posts)))

    def post(token_body: tuple[str, dict]) -> None:
        token, body = token_body
        try:
            r = client.post("/api/judgments", json=body, headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError:
            return  # the server was killed while this one was in flight: not acknowledged
        if r.status_code == 201:
            with lock:
                acked.append((token, body, r.json()))
                if stop_after is not None and len(acked) >= stop_after:
                    kill.set()

    with client, ThreadPoolExecutor(len(posts)) as pool:
        list(pool.map(post, posts))


def test_acknowledged_judgments_survive_kill_9(tmp_path):
    items = [{"item_id": f"k{i:02d}", "kind": "pairwise", "prompt": f"Question {i}?", "response_a": f"yes {i}",
              "response_b": f"no {i}"} for i in range(50)]
    task = write_task(tmp_path / "task.jsonl", items, overlap=1)
    db = tmp_path / "db.sqlite"
    server = Server(task, db).start()
    store = Store(db, create=False)  # another process adding annotators while the server runs
    tokens = [store.add_annotator(f"ann{k}")[1] for k in range(5)]
    store.close()
    posts = [(tokens[i % 5], {"item_id": f"k{i:02d}", "choice": "ab"[i % 2], "strength": 1 + i % 3,
                              "reason": f"reason {i}", "idempotency_key": f"kill-test-{i:02d}"}) for i in range(50)]
    acked: list = []
    kill = threading.Event()
    killer = threading.Thread(target=lambda: kill.wait(60) and server.kill())
    killer.start()
    try:
        _post_all(server.url, posts, acked, stop_after=25, kill=kill)
    finally:
        kill.set()
        killer.join()
        server.kill()
    assert len(acked) >= 25
    # every acknowledged judgment is on disk, as acknowledged, once
    raw = sqlite3.connect(db)
    rows = {key: (item, choice, strength, reason) for key, item, choice, strength, reason in
            raw.execute("SELECT judgment_key, item_id, choice, strength, reason FROM judgments")}
    assert raw.execute("SELECT COUNT(*), COUNT(DISTINCT judgment_key) FROM judgments").fetchone() == (len(rows),) * 2
    for _, body, answer in acked:
        assert rows[body["idempotency_key"]] == (body["item_id"], body["choice"], body["strength"], body["reason"])
        assert answer["item_id"] == body["item_id"]
    raw.close()
    # restart on the same database and retry everything: each judgment is stored exactly once
    server = Server(task, db, port=server.port).start()
    try:
        again: list = []
        _post_all(server.url, posts, again, stop_after=None, kill=threading.Event())
        assert len(again) == 50
        replayed = {body["idempotency_key"] for _, body, answer in again if answer["replayed"]}
        assert {body["idempotency_key"] for _, body, _ in acked} <= replayed
        raw = sqlite3.connect(db)
        assert raw.execute("SELECT COUNT(*), COUNT(DISTINCT judgment_key), COUNT(DISTINCT item_id) "
                           "FROM judgments").fetchone() == (50, 50, 50)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        server.stop()


def test_pages_and_api_share_one_table(tmp_path):
    items = [{"item_id": f"s{i}", "kind": "pairwise", "prompt": "p", "response_a": f"x{i}", "response_b": f"y{i}"}
             for i in range(2)]
    task = write_task(tmp_path / "task.jsonl", items, overlap=1)
    db = tmp_path / "db.sqlite"
    server = Server(task, db).start()
    try:
        link, token = add_annotator(db, "ann", server.url)
        with httpx.Client(base_url=server.url, follow_redirects=True) as browser:
            assert browser.get(link).status_code == 200  # the link sets the cookie and lands on the first item
            page = browser.get("/").text
            fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page))
            r = browser.post("/judge", data={**fields, "choice": "tie"}, follow_redirects=False)
            assert r.status_code == 303
        api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"})
        nxt = api.get("/api/next").json()
        assert nxt["item_id"] != fields["item_id"]
        assert api.post("/api/judgments", json={"item_id": nxt["item_id"], "choice": "a"}).status_code == 201
        assert api.get("/api/next").status_code == 204
        out = tmp_path / "judgments.jsonl"
        cli("export", str(db), "--kind", "judgments", "--out", str(out))
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted((r["item_id"], r["choice"]) for r in rows) == sorted([(fields["item_id"], "tie"), (nxt["item_id"], "a")])
        assert {r["annotator"] for r in rows} == {"ann"}
    finally:
        server.stop()


def test_serve_errors_are_one_line(tmp_path, capsys):
    task = write_task(tmp_path / "task.jsonl", vader_items(2))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(task), "--db", str(tmp_path / "db.sqlite"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "x", "kind": "pairwise"}\n')
    assert main(["serve", str(bad), "--db", str(tmp_path / "db2.sqlite")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: field 'response_a'" in err and "Traceback" not in err
    reseeded = write_task(tmp_path / "seed.jsonl", vader_items(2), seed=5)
    assert main(["serve", str(reseeded), "--db", str(tmp_path / "db.sqlite"), "--port", str(port)]) == 2
    assert "made with task seed 0" in capsys.readouterr().err
