"""The survey audit: attribute inversion of a decision tree, served per output policy."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlinvert.attacks.tree_inversion import TreeAttackConfig
from mlinvert.audit.channels import ONE_THREAD_ENV, ram_query_log
from mlinvert.audit.config import TREE_DEFENSES, AuditConfig
from mlinvert.audit.context import Event
from mlinvert.audit.results import ResultsFile, json_safe, markdown_table
from mlinvert.data.base import Split
from mlinvert.defenses.spec import Defense
from mlinvert.errors import ConfigError, DataError
from mlinvert.evaluation.trees import (
    plot_depth_sweep,
    render_defense_table,
    render_tree_table,
    run_tree_audit,
)
from mlinvert.oracle.http import HttpOracle
from mlinvert.service.runner import ServiceProcess
from mlinvert.service.store import Store
from mlinvert.targets import io
from mlinvert.targets.files import is_model_file, load_survey_tree
from mlinvert.targets.tree import train_tree


def run_tree(config: AuditConfig, results: ResultsFile, dataset: Any, emit: Event) -> None:
    """Survey data: the decision-tree attribute-inversion audit (paper-shaped tables).

    The target tree is ``model_dir`` (its card's member split is used), a scikit-learn
    ``DecisionTreeClassifier`` file (``.joblib`` / ``.skops``, fitted on the members of
    ``--data``'s split: :func:`~mlinvert.targets.files.load_survey_tree`, saved as
    ``DIR/models/tree``), or is trained once and saved to ``DIR/models/tree``; unless
    ``in_process`` it is served by the real service (one model name per output policy,
    see :func:`_tree_service`), and the black-box estimators query it over HTTP. The
    privacy-aware CART sweep (``tree_depths``) is attacked in process.
    """

    emit("stage", {"name": f"decision-tree audit on {dataset.spec}"})
    defenses = [Defense.parse(x) for x in (config.defenses or TREE_DEFENSES)]
    limited = [d.name for d in defenses if d.rate is not None or d.detector is not None]
    if limited:
        raise ConfigError(
            f"the survey (decision-tree) audit runs output policies only, not rate limits or "
            f"detectors ({', '.join(limited)}): every estimator needs all its candidate rows "
            "answered; drop the rate: and detect parts"
        )
    policies = tuple(dict.fromkeys(d.policy for d in defenses))

    model, folder, dataset = _target_tree(config, results.out, dataset, emit)
    served: _TreeOracles | None = None
    with contextlib.ExitStack() as stack:
        if not config.in_process:
            served = stack.enter_context(_tree_service(results.out, folder, model, policies, emit))
        records = run_tree_audit(
            dataset,
            seed=config.seed,
            policies=policies,
            model=model,
            oracle_factory=None if served is None else served.oracle,
            depths=config.tree_depths,
        )
    service = None if served is None else served.summary
    route = "in-process" if config.in_process else "http"
    records = [
        {**{k: json_safe(v) for k, v in r.items()}, "channel": _tree_channel(r, policies, route)}
        for r in records
    ]
    plot = results.out / "images" / "tree_depth_sweep.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    if config.tree_depths:
        plot_depth_sweep(records, plot)
    where = (
        "the real HTTP service (query log in service/tree.sqlite3)"
        if service is not None
        else "an in-process oracle through the same Predictor"
    )
    results.doc["dataset"] = {"spec": dataset.spec, "kind": "survey"}
    xt, yt = dataset.nonmembers()
    results.doc["targets"]["tree"] = {
        "kind": model.kind,
        "test_accuracy": float((model.predict(xt) == yt).mean()) if yt.size else None,
        "model_dir": str(folder),
    }
    results.doc["tree_audit"] = {
        "title": "Attribute inversion of the sensitive survey answer (Fredrikson et al., "
        "CCS 2015, Section 5), beside the paper's numbers; then each defence, including the "
        "privacy-aware CART that places the sensitive feature at depth L. The black-box "
        f"estimators queried {where}.",
        "route": route,
        "policies": list(policies),
        "service": service,
        "tables": [
            markdown_table(render_tree_table(records), "estimators vs the paper"),
            markdown_table(render_defense_table(records), "per defence"),
        ],
        "plot": "images/tree_depth_sweep.png" if config.tree_depths else None,
        "records": records,
    }


def _target_tree(
    config: AuditConfig, out: Path, dataset: Any, emit: Event
) -> tuple[Any, Path, Any]:
    """The audited tree, the folder it is served from, and the data set (with the
    folder's member split where its card has one)."""
    if config.model_dir is not None and is_model_file(config.model_dir):
        emit("stage", {"name": f"reading the scikit-learn tree in {config.model_dir}"})
        model, card = load_survey_tree(config.model_dir, dataset)
    elif config.model_dir is not None:
        model, dataset = _load_tree(config.model_dir, dataset)
        return model, config.model_dir, dataset
    else:
        emit("stage", {"name": "training the survey tree"})
        model, card = train_tree(dataset, seed=config.seed)
    folder = out / "models" / "tree"
    io.save(model, folder, card=card)
    return model, folder, dataset


def _load_tree(folder: Path, dataset: Any) -> tuple[Any, Any]:
    """The tree in ``folder`` and ``dataset`` with the member split of its card."""

    model = io.load(folder)
    if model.kind != "tree":
        raise ConfigError(
            f"{folder} holds a {model.kind!r} model; survey data is audited on a decision "
            "tree (train one with `mlinvert train --data SPEC --model tree`, or drop --model)"
        )
    if tuple(model.feature_names_) != tuple(dataset.feature_names):
        raise DataError(
            f"the tree in {folder} reads {list(model.feature_names_)}, the data {dataset.spec} "
            f"has {list(dataset.feature_names)}; pass the --data it was trained on"
        )
    split = io.read_card(folder).get("split")
    if isinstance(split, dict):
        dataset = dataclasses.replace(dataset, split=Split.from_dict(split))
    return model, dataset


def _tree_channel(record: dict[str, Any], policies: tuple[str, ...], route: str) -> str:
    """How an estimator got at the tree: no access, the model document, or an API."""
    if record["n_queries"] == 0 and record["estimator"] in ("random", "always-no", "ideal"):
        return "none (baseline)"
    if record["estimator"].startswith("white-box"):
        return "model document"
    # run_tree_audit labels the main target's black-box records with the policy itself
    if route == "http" and record["defense"] in policies:
        return "HTTP API"
    return "in-process API"


@dataclass
class _TreeOracles:
    """The survey tree served under one model name per output policy.

    ``oracle(model, policy)`` is the ``oracle_factory`` of
    :func:`mlinvert.evaluation.trees.run_tree_audit`: each call is one attacker with a
    fresh account (API key) on the model name that serves ``policy``. ``summary`` holds
    the service's own query counts once the service has stopped.
    """

    model: Any
    store: Any
    urls: dict[str, str]
    oracles: list[Any] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    def oracle(self, model: Any, policy: str) -> Any:
        """A fresh-account HttpOracle on the model name serving ``policy``."""

        if model is not self.model:
            raise ConfigError(
                "the survey service serves only the audited tree; other trees (depth sweep, "
                "DP, pruning) are attacked in process"
            )
        if policy not in self.urls:
            raise ConfigError(f"policy {policy!r} is not served; served: {', '.join(self.urls)}")
        slug = Defense(name=policy).slug
        key, _ = self.store.create_key(f"audit-tree-{slug}-{len(self.oracles) + 1}")
        oracle = HttpOracle(self.urls[policy], key, max_wait=0.0)
        self.oracles.append(oracle)
        return oracle


@contextlib.contextmanager
def _tree_service(
    out: Path, folder: Path, model: Any, policies: tuple[str, ...], emit: Event
) -> Iterator[_TreeOracles]:
    """Run ``mlinvert serve`` once for the tree ``model`` saved in ``folder``.

    The same folder is served as ``tree-<policy>`` with that policy for each of
    ``policies`` (``--model-policy``), so every policy is one model name of one process.
    The query log lives on the RAM disk while the service runs and is copied to
    ``out/service/tree.sqlite3`` afterwards; ``summary`` counts its requests and inputs
    per model name and account.
    """

    names = {p: f"tree-{Defense(name=p).slug}" for p in policies}
    final_db = out / "service" / "tree.sqlite3"
    emit("stage", {"name": f"starting the service for {', '.join(names.values())}"})
    with ram_query_log(final_db) as db, contextlib.closing(Store(db)) as store:
        with ServiceProcess(
            [f"{n}={folder}" for n in names.values()],
            db=db,
            model_policies={n: p for p, n in names.items()},
            max_batch=TreeAttackConfig().batch_size,
            env=ONE_THREAD_ENV,
        ) as service:
            served = _TreeOracles(
                model=model,
                store=store,
                urls={p: service.model_url(n) for p, n in names.items()},
            )
            try:
                yield served
            finally:
                for o in served.oracles:
                    o.close()
        served.summary = {
            "url": service.url,
            "models": {n: p for p, n in names.items()},
            "query_log": str(final_db.relative_to(out)),
            **query_counts(store),
        }


def query_counts(store: Any) -> dict[str, Any]:
    """Requests, answered inputs and refusals in the service's query log."""
    per_model: dict[str, dict[str, int]] = {}
    per_account: dict[str, int] = {}
    for q in store.queries():
        m = per_model.setdefault(str(q.model), {"requests": 0, "inputs": 0, "refused": 0})
        m["requests"] += 1
        if q.status == 200:
            m["inputs"] += q.n_inputs
            per_account[str(q.account)] = per_account.get(str(q.account), 0) + q.n_inputs
        else:
            m["refused"] += 1
    return {
        "requests": sum(m["requests"] for m in per_model.values()),
        "inputs": sum(m["inputs"] for m in per_model.values()),
        "per_model": per_model,
        "inputs_per_account": per_account,
    }
