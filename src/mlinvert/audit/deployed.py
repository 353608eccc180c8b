"""Auditing a prediction API that is already deployed (``--api``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mlinvert.attacks.presets import Preset, preset_for
from mlinvert.audit.config import AuditConfig
from mlinvert.audit.context import AuditContext, AuditTarget, Event
from mlinvert.audit.faces import attacker_prior, describe_dataset, fit_judge
from mlinvert.audit.matrix import attack_matrix
from mlinvert.audit.results import ResultsFile
from mlinvert.core import OracleInfo
from mlinvert.data.base import ImageDataset
from mlinvert.defenses.ratelimit import parse_rate
from mlinvert.defenses.spec import Defense
from mlinvert.errors import Blocked, DataError, OracleError, RateLimited, Unauthorized, UnknownModel
from mlinvert.evaluation.utility import answers, served_utility
from mlinvert.oracle.http import HttpOracle
from mlinvert.targets.io import read_card

#: The one defence row of an audit of a deployed API (``--api``).
DEPLOYED = "deployed"


#: Inputs per request of the honest client measuring a deployed API's served accuracy.
_UTILITY_BATCH = 16


def _open_api(config: AuditConfig, dataset: ImageDataset) -> list[Any]:
    """An HttpOracle per ``config.api_keys`` on the first ``config.api`` URL, then one for
    ``config.utility_key`` if given, speaking ``config.wire`` (what the server does not
    declare, its input shape and classes, taken from ``dataset``); the service's
    description read and every key checked (mlinvert's API: no query spent; v2 and rest
    may spend a probe), and every other URL (a cluster's replicas) checked to serve the
    same: a clear OracleError otherwise."""

    url = config.api_urls[0]
    keys = [*config.api_keys, *([config.utility_key] if config.utility_key else [])]
    names = [f"--api-key #{i + 1} of {len(config.api_keys)}" for i in range(len(config.api_keys))]
    names += ["--utility-key"] if config.utility_key else []
    wire = dataclasses.replace(
        config.wire,
        input_shape=config.wire.input_shape or tuple(dataset.image_shape),
        class_names=config.wire.class_names or tuple(dataset.class_names),
    )
    oracles = [HttpOracle(url, key, wire=wire, max_wait=0.0, max_retries=2) for key in keys]
    try:
        try:
            oracles[0].info  # noqa: B018 - fetch the listing: reachable, model served
        except UnknownModel as exc:
            raise UnknownModel(f"{exc}; check the model name at the end of --api") from None
        except Unauthorized as exc:
            raise Unauthorized(
                f"{url} refused the model listing with --api-key #1 ({exc}); check the key"
            ) from None
        except OracleError as exc:
            raise OracleError(
                f"cannot reach the deployed API {url} ({exc}); check --api (host, port, "
                "http/https) and that the service is running"
            ) from None
        for name, oracle in zip(names, oracles, strict=True):
            try:
                oracle.check_key()
            except Unauthorized as exc:
                raise Unauthorized(
                    f"{url} refused {name} ({exc}); check the "
                    "key (the service owner creates keys with `mlinvert keys create`)"
                ) from None
        for other in config.api_urls[1:]:
            _check_replica(other, keys[0], wire, oracles[0].info)
    except BaseException:
        for oracle in oracles:
            oracle.close()
        raise
    return oracles


def _check_replica(url: str, key: str, wire: Any, first: OracleInfo) -> None:
    """The replica at ``url`` serves what the first ``--api`` URL does (model, classes,
    input shape, policy, rate limit, detector): OracleError naming the difference."""
    with HttpOracle(url, key, wire=wire, max_wait=0.0, max_retries=2) as o:
        try:
            info = o.info
            o.check_key()
        except OracleError as exc:
            raise OracleError(
                f"the --api replica {url} did not answer its model listing with --api-key #1 "
                f"({exc}); check the URL, that it runs, and that it shares the first's keys"
            ) from None

    def served(i: OracleInfo) -> tuple[Any, ...]:
        limits = (i.extra.get("rate_limit"), i.extra.get("detector"))
        return (i.model, tuple(i.class_names), tuple(i.input_shape), i.policy, *limits)

    if served(info) != served(first):
        raise OracleError(
            f"the --api replica {url} serves {info.model!r} under policy {info.policy}, "
            f"rate limit {info.extra.get('rate_limit')}, detector {info.extra.get('detector')}"
            f"; the first URL serves {first.model!r} under {first.policy}, "
            f"{first.extra.get('rate_limit')}, {first.extra.get('detector')} (or their "
            "classes or input shapes differ): list replicas of one deployment"
        )


def _check_served(info: Any, dataset: ImageDataset, url: str) -> None:
    """The deployed model must classify the data set's people and read its images."""
    served, ours = tuple(info.class_names), tuple(dataset.class_names)
    if served != ours:
        pairs = enumerate(zip(served, ours, strict=False))
        differ = next(
            (f"#{i}: {a!r} vs {b!r}" for i, (a, b) in pairs if a != b),
            f"{len(served)} vs {len(ours)} classes",
        )
        raise DataError(
            f"the model at {url} has classes {list(served[:5])}{'...' if len(served) > 5 else ''}"
            f" ({len(served)}), the data {dataset.spec} has {list(ours[:5])}"
            f"{'...' if len(ours) > 5 else ''} ({len(ours)}); first difference {differ}. "
            "Pass the --data the deployed model was trained on"
        )
    if tuple(info.input_shape) != tuple(dataset.image_shape):
        raise DataError(
            f"the model at {url} takes images {tuple(info.input_shape)}, the data "
            f"{dataset.spec} has {dataset.image_shape}; pass the --data it was trained on"
        )


def _deployed_defense(info: Any) -> tuple[Defense, str]:
    """The one defence row of a deployed API and the words describing what it advertises."""
    rate = info.extra.get("rate_limit")
    detector = info.extra.get("detector")
    defense = Defense(name=DEPLOYED, policy=str(info.policy), rate=rate, detector=detector)
    words = (
        f"what {info.extra.get('url')} advertises: output policy {info.policy} "
        f"(answers carry {info.carries}), "
        + (f"rate limit {rate} per account" if rate else "no rate limit")
        + ", "
        + (f"query detector {detector}" if detector else "no query detector")
    )
    return defense, words


def run_deployed(
    config: AuditConfig, results: ResultsFile, dataset: ImageDataset, emit: Event
) -> None:
    """Audit a prediction API already deployed (``config.api``): the API attacks under
    the one defence it advertises, judged against the owner's data."""
    preset = preset_for(dataset.image_shape, config.quick)
    budget = config.budget or preset.budget
    emit("stage", {"name": f"reading {config.api}"})
    oracles = _open_api(config, dataset)
    try:
        _audit_deployed(config, results, dataset, emit, oracles, preset, budget)
    finally:
        for oracle in oracles:
            oracle.close()


def _audit_deployed(
    config: AuditConfig,
    results: ResultsFile,
    dataset: ImageDataset,
    emit: Event,
    oracles: list[Any],
    preset: Preset,
    budget: int,
) -> None:
    """The deployed-API audit once the keys are checked: describe the deployment, fit
    the judge, measure the served accuracy, attack. ``oracles``: one per attacker key,
    then the honest client's (``--utility-key``) if given."""
    attackers = oracles[: len(config.api_keys)]
    honest, honest_name = (
        (oracles[-1], "--utility-key") if config.utility_key else (oracles[0], "--api-key #1")
    )
    info = oracles[0].info
    _check_served(info, dataset, oracles[0].url)
    defense, words = _deployed_defense(info)
    labels = describe_dataset(config, results, dataset, preset, budget, [defense])
    doc = results.doc
    doc["defenses"] = [{**asdict(defense), "description": words}]
    card: dict[str, Any] = {}
    if config.model_dir is not None:
        card = read_card(config.model_dir)
    target = AuditTarget(
        name=re.sub(r"[^A-Za-z0-9._-]+", "_", info.model) or "deployed",
        model=None,
        card=card,
        folder=Path(config.model_dir or "."),
    )
    # inputs each key had answered in the earlier runs this one resumes
    answered = dict(doc.get("deployment", {}).get("answered") or {})
    doc["deployment"] = {
        **_deployment(info, oracles[0].url, words),
        "keys": len(attackers),
        "utility_key": honest_name,
        "answered": answered,
        "split_from": (
            f"the card of {config.model_dir}"
            if isinstance(card.get("split"), dict)
            else f"the default split of {dataset.spec}"
        ),
    }
    doc["targets"][target.name] = {
        "kind": info.kind,
        "test_accuracy": None,  # the weights are not used; served accuracy in utility
        "model_dir": None,
        "api": oracles[0].url,
        "privacy": card.get("privacy"),
    }
    judge = fit_judge(config, results, dataset, labels, emit)
    measured = doc["utility"].get(target.name, {}).get(DEPLOYED)
    if measured is None:  # a resumed run keeps its measurement (it spent real queries)
        emit("stage", {"name": "measuring the served accuracy through the API"})
        doc["utility"][target.name] = {
            DEPLOYED: _deployed_utility(honest, honest_name, defense, dataset)
        }
    results.save()
    ctx = AuditContext(
        config=config,
        results=results,
        dataset=dataset,
        preset=preset,
        targets=[target],
        judge=judge,
        labels=labels,
        defenses=[defense],
        events=emit,
        api_oracles=attackers,
        prior=attacker_prior(config, results, dataset),
    )
    attack_matrix(ctx)


def _deployment(info: OracleInfo, url: str, words: str) -> dict[str, Any]:
    """What the deployed API says of itself (``results.json`` "deployment")."""
    return {
        "url": url,
        "model": info.model,
        "kind": info.kind,
        "policy": info.policy,
        "carries": info.carries,
        "rate_limit": info.extra.get("rate_limit"),
        "detector": info.extra.get("detector"),
        "max_batch": info.extra.get("max_batch"),
        "protocol": info.extra.get("protocol", "mlinvert"),
        "tensors": info.extra.get("tensors"),  # v2: binary or JSON tensors
        "description": words,
    }


def _deployed_utility(
    oracle: Any, key_name: str, defense: Defense, dataset: ImageDataset
) -> dict[str, Any]:
    """Served accuracy of a deployed API: the held-out inputs sent through ``oracle``
    (the key called ``key_name``: ``--utility-key``, else the attacker's first),
    ``_UTILITY_BATCH`` a request, as an honest client would.

    Skipped (``accuracy`` None and ``skipped`` saying why) when the advertised rate
    limit is smaller than the held-out set or the service refuses on the way (rate
    limited, blocked); rows it refused count as wrong answers, as in the normal audit.
    """

    x, y = dataset.test()
    n_classes = dataset.n_classes
    base: dict[str, Any] = {
        "policy": defense.policy,
        "rate_limit": defense.rate,
        "detector": defense.detector,
        "labels_unchanged": None,  # unknown: the raw model is not queried
        "n_test": len(y),
    }
    skipped: str | None = None
    if defense.rate is not None:
        allowance = parse_rate(defense.rate).count
        if allowance < len(y):
            skipped = (
                f"not measured: the advertised rate limit ({defense.rate} per account) is "
                f"smaller than the {len(y)} held-out inputs"
            )
    labels: list[np.ndarray] = []
    probs: list[np.ndarray | None] = []
    refused = 0
    start_n = oracle.n_queries
    if skipped is None:
        for start in range(0, len(x), _UTILITY_BATCH):
            chunk = x[start : start + _UTILITY_BATCH]
            try:
                r = oracle.query(chunk)
            except Blocked:
                refused += len(chunk)
                labels.append(np.full(len(chunk), -1, dtype=np.int64))
                probs.append(None)
                continue
            except RateLimited as exc:
                skipped = (
                    f"not measured: the service rate limited {key_name} after "
                    f"{oracle.n_queries - start_n} of the {len(y)} held-out inputs ({exc})"
                )
                break
            labels.append(np.asarray(r.labels))
            probs.append(r.probs)
    spent = oracle.n_queries - start_n
    if skipped is not None:
        return {
            **base,
            **dict.fromkeys(("accuracy", "ece", "topk_accuracy", "brier", "k")),
            "carries": "label" if defense.policy == "labels" else None,
            "skipped": skipped,
            "queries_spent": spent,
            "measured_through": f"the deployed API with {key_name} ({spent} queries)",
        }
    util = served_utility(answers(labels, probs), y, n_classes)
    return {
        **util,
        **base,
        "honest_refused": refused,
        "queries_spent": spent,
        "measured_through": (
            f"the deployed API with {key_name}: the {len(y)} held-out inputs, "
            f"{_UTILITY_BATCH} per request ({spent} queries spent on that key)"
        ),
    }
