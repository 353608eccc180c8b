"""The real service: ``mlinvert serve`` under uvicorn in a subprocess, on loopback.

Parity with LocalOracle under several policies, rate-limit exactness under 20
concurrent clients, and two service processes sharing one budget through a real
redis-server.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from mlinvert.defenses import Predictor, RateLimiter, parse_policy
from mlinvert.errors import RateLimited
from mlinvert.oracle import HttpOracle, LocalOracle
from mlinvert.service import Store
from mlinvert.service.runner import ServiceProcess

BUDGET = 200
#: The budget comes back over 30 days (one input every 3.6 hours), so no refill can
#: admit an extra batch however slowly the clients run: the exact counts hold.
RATE = f"{BUDGET}/30d"
POLICIES = {
    "full": "full",
    "topround": "top:3+round:2",
    "deceive": "reverse-sigmoid:0.6:0.4+noise:0.01:5",
    "labels": "labels",
}
SHAPE = (8, 8)


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def spend(urls: list[str], key: str, threads: int = 20, batch: int = 3) -> int:
    """Clients hammer the services until refused; return the inputs admitted."""
    admitted = [0] * threads
    start = threading.Barrier(threads)
    x = np.full((batch, *SHAPE), 0.5, dtype=np.float32)

    def client(i: int) -> None:
        with HttpOracle(urls[i % len(urls)], key, max_wait=0.0) as oracle:
            oracle.info  # noqa: B018 - fetch the listing before the race starts
            start.wait()
            while True:
                try:
                    oracle.query(x)
                except RateLimited:
                    break
            admitted[i] = oracle.n_queries

    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    return sum(admitted)


def test_real_service_parity_budget_and_limits(tmp_path: Path, model_dir: tuple[Path, Any]) -> None:
    folder, model = model_dir
    db = tmp_path / "service.db"
    store = Store(db)
    keys = {name: store.create_key(f"alice-{name}")[0] for name in POLICIES}
    bob, _ = store.create_key("bob")
    with ServiceProcess(
        [f"{name}={folder}" for name in POLICIES],
        db=db,
        policy="full",
        model_policies=POLICIES,
        rate_limit=RATE,
        max_batch=32,
        max_body_bytes=2**20,
    ) as service:
        for name, policy in POLICIES.items():
            local = LocalOracle(
                Predictor(
                    model,
                    name=name,
                    policy=parse_policy(policy),
                    max_batch=32,
                    guards=[RateLimiter(RATE)],
                )
            )
            for encoding in ("binary", "json"):
                with HttpOracle(service.model_url(name), keys[name], encoding=encoding) as oracle:
                    assert oracle.info.policy == local.info.policy == parse_policy(policy).name
                    assert oracle.info.class_names == local.info.class_names
                    for seed, n in ((1, 1), (2, 32), (3, 7)):
                        x = inputs(n, seed)
                        got, want = oracle.query(x), local.query(x)
                        assert np.array_equal(got.labels, want.labels)
                        assert got.label_names == want.label_names
                        if want.probs is None:
                            assert got.probs is None
                        else:
                            assert got.probs is not None
                            assert np.array_equal(got.probs, want.probs)
                    assert oracle.n_queries == 40
            assert local.n_queries == 80
        # the budget is exact under 20 concurrent clients on one key
        assert spend([service.model_url("full")], bob) == BUDGET - BUDGET % 3
        r = httpx.post(
            service.model_url("full") + "/predict",
            content=b"x" * 2**21,
            headers={"X-API-Key": keys["full"]},
        )
        assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    for name in POLICIES:
        outcomes = [q.outcome for q in store.queries(f"alice-{name}")]
        assert outcomes.count("ok") == 6
    assert store.queries("alice-full")[-1].outcome == "InputTooLarge"
    admitted = sum(q.n_inputs for q in store.queries("bob") if q.outcome == "ok")
    assert admitted == BUDGET - BUDGET % 3


@pytest.mark.redis
def test_ctrl_c_while_the_service_starts_stops_the_process(
    tmp_path: Path, model_dir: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the wait for /healthz (seconds, while the child imports torch) left
    the service running: ``__enter__`` raised, so ``__exit__`` never stopped it."""

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(httpx.Client, "get", interrupt)  # the first /healthz poll
    service = ServiceProcess([str(model_dir[0])], db=tmp_path / "s.db")
    with pytest.raises(KeyboardInterrupt), service:
        pytest.fail("the service answered before the first wait")
    assert service.process is not None and service.process.poll() is not None


def test_two_processes_share_one_budget_through_redis(
    tmp_path: Path, model_dir: tuple[Path, Any], redis_url: str
) -> None:
    folder, _ = model_dir
    db = tmp_path / "service.db"
    key, _ = Store(db).create_key("carol")
    common: dict[str, Any] = {"db": db, "rate_limit": RATE, "redis_url": redis_url}
    first = ServiceProcess([f"faces={folder}"], **common)
    second = ServiceProcess([f"faces={folder}"], **common)
    starting = threading.Thread(target=second.start)
    starting.start()
    with first:
        starting.join()
        try:
            urls = [first.model_url("faces"), second.model_url("faces")]
            assert spend(urls, key) == BUDGET - BUDGET % 3
        finally:
            second.stop()


def test_attack_cli_moves_to_the_next_api_key_when_one_is_refused(
    tmp_path: Path, model_dir: tuple[Path, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--api-key K1,K2,K3`: each key gets 40 inputs an hour; the black-box attack spends
    one key, then the next, past what any single key allows. It starts by saying what
    each key may send, and stops there on a key the service refuses."""
    import json

    from mlinvert.cli.main import main

    folder, _ = model_dir
    db = tmp_path / "service.db"
    store = Store(db)
    keys = [store.create_key(f"sybil-{i}")[0] for i in range(3)]
    revoked = store.create_key("gone")[0]
    store.revoke("gone")
    out = tmp_path / "attack"
    with ServiceProcess([f"toy={folder}"], db=db, rate_limit="40/hour") as service:
        with pytest.raises(SystemExit) as refused:
            url = service.model_url("toy")
            args = ["--label", "s0", "--api-key", f"{keys[0]},{revoked}", "--out", str(out)]
            main(["attack", "miface", "--target", url, "--mode", "blackbox", *args])
        assert (
            refused.value.code == 2 and f"{revoked[:12]}... was revoked" in capsys.readouterr().err
        )
        assert not out.exists() and store.queries() == []  # refused before any query
        with pytest.raises(SystemExit) as done:
            main(
                [
                    "attack",
                    "miface",
                    "--target",
                    service.model_url("toy"),
                    "--api-key",
                    ",".join(keys),
                    "--mode",
                    "blackbox",
                    "--gradient",
                    "nes",
                    "--samples",
                    "5",
                    "--label",
                    "s0",
                    "--budget",
                    "100",
                    "--out",
                    str(out),
                ]
            )
    assert done.value.code == 0
    said = capsys.readouterr().err
    assert all(f"account sybil-{i}: 40 of 40/hour inputs left" in said for i in range(3)), said
    result = json.loads((out / "result.json").read_text())
    answered = [
        sum(q.n_inputs for q in store.queries(f"sybil-{i}") if q.outcome == "ok") for i in range(3)
    ]
    assert answered[0] > 30 and answered[1] > 30 and answered[2] > 0, answered
    assert result["n_queries"] == sum(answered) > 80
    assert result["extra"]["api_keys_used"] == 3


def test_attack_cli_escalates_its_blinding_when_a_key_is_blocked(
    tmp_path: Path, model_dir: tuple[Path, Any]
) -> None:
    """Ten keys against `detect:block:1` (one near duplicate blocks): finite differences
    blinded with a fixed +-0.001 are blocked on the first keys and the attack ends
    `blocked`; with `--escalate` each blocked key doubles the noise for the next, until
    the probes no longer look alike and the attack spends its whole budget."""
    import json

    from mlinvert.cli.main import main

    folder, _ = model_dir
    db = tmp_path / "service.db"
    store = Store(db)
    args = ["attack", "miface", "--mode", "blackbox", "--gradient", "fd", "--label", "s0"]
    args += ["--budget", "300", "--blind", "0.001"]
    results = {}
    with ServiceProcess([f"toy={folder}"], db=db, detector="detect:block:1") as service:
        for how in ("fixed", "escalate"):
            keys = [store.create_key(f"{how}-{i}")[0] for i in range(10)]
            more = ["--escalate"] if how == "escalate" else []
            out = tmp_path / how
            with pytest.raises(SystemExit) as done:
                url = service.model_url("toy")
                main(
                    [*args, *more, "--target", url, "--api-key", ",".join(keys), "--out", str(out)]
                )
            assert done.value.code == 0
            results[how] = json.loads((out / "result.json").read_text())
    flagged = [f.flag.account for f in store.flags()]
    fixed, rising = results["fixed"], results["escalate"]
    assert fixed["per_label"][0]["status"] == "blocked"
    assert fixed["extra"]["blinded_up_to"] == 0.001 and fixed["extra"]["escalate"] is False
    assert rising["per_label"][0]["status"] == "budget_exhausted"
    used = rising["extra"]["api_keys_used"]
    assert 3 <= used <= 10 and rising["extra"]["escalate"] is True
    # every key but the last was blocked, and each doubled the noise
    assert [a for a in flagged if a.startswith("escalate")] == [
        f"escalate-{i}" for i in range(used - 1)
    ]
    assert rising["extra"]["blinded_up_to"] == pytest.approx(0.001 * 2 ** (used - 1))
    answered = [
        sum(q.n_inputs for q in store.queries(f"escalate-{i}") if q.outcome == "ok")
        for i in range(10)
    ]
    assert rising["n_queries"] == sum(answered) > fixed["n_queries"]


def test_attack_cli_resumed_with_a_checkpoint_moves_past_a_key_blocked_meanwhile(
    tmp_path: Path, model_dir: tuple[Path, Any]
) -> None:
    """`--checkpoint F` with several keys keeps what each key answered (`F.keys.json`, by
    fingerprint); when the service blocks the first key between two runs, the second run
    moves on to the next key instead of stopping as if its batch were refused by any."""
    import json

    from mlinvert.cli.main import main
    from mlinvert.defenses.detector import Flag
    from mlinvert.oracle.http import key_fingerprint

    folder, _ = model_dir
    db = tmp_path / "service.db"
    store = Store(db)
    keys = [store.create_key(f"sybil-{i}")[0] for i in range(2)]
    ckpt = tmp_path / "attack.npz"
    args = ["attack", "miface", "--mode", "blackbox", "--gradient", "nes", "--samples", "5"]
    args += ["--budget", "100", "--api-key", ",".join(keys), "--checkpoint", str(ckpt)]

    def run(label: str, url: str) -> dict[str, Any]:
        out = tmp_path / label
        with pytest.raises(SystemExit) as done:
            main([*args, "--target", url, "--label", label, "--out", str(out)])
        assert done.value.code == 0
        return dict(json.loads((out / "result.json").read_text()))

    def answered(account: str) -> int:
        return sum(q.n_inputs for q in store.queries(account) if q.outcome == "ok")

    with ServiceProcess([f"toy={folder}"], db=db, detector="detect:block:5000") as service:
        first = run("s0", service.model_url("toy"))
        ledger = json.loads((tmp_path / "attack.npz.keys.json").read_text())
        assert ledger == {key_fingerprint(keys[0]): first["n_queries"], key_fingerprint(keys[1]): 0}
        assert answered("sybil-0") == first["n_queries"] > 0
        store.flag(Flag(account="sybil-0", at=0.0, near_duplicates=1, inputs=1, detail="test"))
        second = run("s1", service.model_url("toy"))
    assert second["per_label"][0]["status"] != "blocked"
    assert answered("sybil-1") == second["n_queries"] > 0
    assert answered("sybil-0") == first["n_queries"]
    assert json.loads((tmp_path / "attack.npz.keys.json").read_text()) == {
        key_fingerprint(keys[0]): first["n_queries"],
        key_fingerprint(keys[1]): second["n_queries"],
    }


def test_a_huge_body_gets_its_answer_unread_over_a_real_socket(
    tmp_path: Path, model_dir: tuple[Path, Any]
) -> None:
    """uvicorn delivers the refusal of a body it never read (60 MB declared, 64 KB sent),
    closes the connection, and logs no traceback; a small refused body is drained, and
    its connection kept open."""
    import socket

    folder, _ = model_dir
    db = tmp_path / "service.db"
    key, _ = Store(db).create_key("alice")
    with ServiceProcess([f"toy={folder}"], db=db) as service:
        head = (
            "POST /v1/models/toy/predict HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 60000000\r\n"
        )
        answers = []
        for extra in ("", f"X-API-Key: {key}\r\n"):
            with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
                sock.sendall((head + extra + "\r\n").encode() + b"0.1," * 16384)
                answer = b""
                while chunk := sock.recv(65536):  # until the server closes
                    answer += chunk
            answers.append(answer)
        with httpx.Client(base_url=service.url) as client:
            refused = client.post("/v1/models/toy/predict", content=b"[0.1]" * 1000)
        log = service.log()
    assert answers[0].startswith(b"HTTP/1.1 401") and b"connection: close" in answers[0].lower()
    assert answers[1].startswith(b"HTTP/1.1 413") and b"limit of" in answers[1]
    assert refused.status_code == 401 and "connection" not in refused.headers
    assert "Traceback" not in log and "rror" not in log
