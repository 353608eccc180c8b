"""BigML-style decision trees on categorical surveys, keeping class counts at every node.

The tree is a CART (Gini impurity, binary splits) grown on integer category codes. A
split sends a *set* of categories left: ``code == c`` for any feature, and also
``code <= c`` for ordered features. Every node keeps the training count of each class,
so the model can be published as the white-box "downloadable model" document of an
MLaaS (BigML) with those counts (Fredrikson, Jha, Ristenpart, CCS 2015, Section 5).

Answers: ``predict_proba`` is the leaf's class distribution; ``confidence`` is BigML's
Wilson score lower bound (z = 1.96) of the predicted class's share in the leaf.

Countermeasures (same paper, Section 6, and beyond):

- privacy-aware CART: ``TreeConfig(sensitive_depth=l)`` splits on the sensitive feature
  at depth ``l`` (root = depth 0) at every node there that can be split, and nowhere
  else; ``exclude_sensitive=True`` never uses it;
- a differentially private tree: ``TreeConfig(dp_epsilon=eps)`` draws the structure at
  random, independently of the data, and publishes leaf counts with Laplace noise of
  scale 1/eps (one row changes one leaf count by one, so the whole tree is eps-DP by
  parallel composition). This is diffprivlib's random-tree mechanism (Fletcher and
  Islam 2017); diffprivlib itself cannot be imported against the installed
  scikit-learn (``sklearn.tree._tree.DOUBLE`` is gone), so it is implemented here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mlinvert.core import Seed, rng_from
from mlinvert.data.surveys import encode_records as _encode_records
from mlinvert.errors import ConfigError, ModelError, NotFittedError, QueryRejected
from mlinvert.targets.base import card_base

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mlinvert.data.surveys import SurveyDataset

log = logging.getLogger(__name__)

DOCUMENT_FORMAT = "mlinvert-tree/1"
Z_95 = 1.96


def wilson_lower(successes: np.ndarray, n: np.ndarray, z: float = Z_95) -> np.ndarray:
    """Wilson score interval lower bound of a share ``successes / n`` (0 where n = 0)."""
    s = np.asarray(successes, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    safe = np.maximum(m, 1e-12)
    p = s / safe
    z2 = z * z
    centre = p + z2 / (2 * safe)
    spread = z * np.sqrt(np.maximum(p * (1 - p) / safe + z2 / (4 * safe * safe), 0.0))
    out = (centre - spread) / (1 + z2 / safe)
    return np.where(m > 0, np.clip(out, 0.0, 1.0), 0.0)


@dataclass(frozen=True, kw_only=True)
class TreeConfig:
    """How to grow the tree.

    ``max_depth`` None grows until leaves are pure or would hold fewer than
    ``min_samples_leaf`` rows (an unpruned BigML-like tree; 2 rows per leaf at least
    by default: with 1 the steak tree memorises so well that labels alone reveal as
    much as the counts); ``sensitive_depth`` / ``exclude_sensitive`` are the privacy-aware CART
    (CCS 2015, Section 6); ``dp_epsilon`` switches to the eps-DP random tree of depth
    ``dp_depth``.
    """

    max_depth: int | None = None
    min_samples_split: int = 2
    min_samples_leaf: int = 2
    sensitive_depth: int | None = None
    exclude_sensitive: bool = False
    dp_epsilon: float | None = None
    dp_depth: int = 6

    def __post_init__(self) -> None:
        if self.max_depth is not None and self.max_depth < 1:
            raise ConfigError(f"max_depth must be >= 1 or None, got {self.max_depth}")
        if self.min_samples_split < 2:
            raise ConfigError(f"min_samples_split must be >= 2, got {self.min_samples_split}")
        if self.min_samples_leaf < 1:
            raise ConfigError(f"min_samples_leaf must be >= 1, got {self.min_samples_leaf}")
        if self.sensitive_depth is not None:
            if self.sensitive_depth < 0:
                raise ConfigError(
                    f"sensitive_depth must be >= 0 (root = 0), got {self.sensitive_depth}"
                )
            if self.exclude_sensitive:
                raise ConfigError("choose sensitive_depth or exclude_sensitive, not both")
            if self.max_depth is not None and self.sensitive_depth >= self.max_depth:
                raise ConfigError(
                    f"sensitive_depth {self.sensitive_depth} must be below "
                    f"max_depth {self.max_depth}"
                )
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            raise ConfigError(f"dp_epsilon must be > 0, got {self.dp_epsilon}")
        if not 1 <= self.dp_depth <= 16:
            raise ConfigError(f"dp_depth must lie in 1..16, got {self.dp_depth}")


class _Builder:
    """Grows the node arrays of one tree (CART or DP random tree)."""

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        sizes: np.ndarray,
        ordered: np.ndarray,
        k: int,
        sensitive: int | None,
        config: TreeConfig,
    ) -> None:
        self.X = X.astype(np.int64)
        self.y = y
        self.sizes = sizes
        self.ordered = ordered
        self.k = k
        self.sensitive = sensitive
        self.config = config
        self.width = int(sizes.max())
        self.feature: list[int] = []
        self.left_set: list[np.ndarray] = []
        self.children: list[list[int]] = []
        self.counts: list[np.ndarray] = []
        self.depth: list[int] = []

    def _new(self, rows: np.ndarray, depth: int) -> int:
        self.feature.append(-1)
        self.left_set.append(np.zeros(self.width, dtype=bool))
        self.children.append([-1, -1])
        self.counts.append(np.bincount(self.y[rows], minlength=self.k).astype(np.float64))
        self.depth.append(depth)
        return len(self.feature) - 1

    def _candidates(
        self, rows: np.ndarray, features: Sequence[int]
    ) -> tuple[float, int, np.ndarray] | None:
        """Best (weighted child impurity, feature, left set) among ``features``."""
        cfg = self.config
        y = self.y[rows]
        best: tuple[float, int, np.ndarray] | None = None
        total = np.bincount(y, minlength=self.k).astype(np.float64)
        for j in features:
            m = int(self.sizes[j])
            table = np.bincount(self.X[rows, j] * self.k + y, minlength=m * self.k)
            table = table.reshape(m, self.k).astype(np.float64)
            lefts = [table]
            sets = [np.eye(m, self.width, dtype=bool)]
            if self.ordered[j] and m > 2:
                lefts.append(np.cumsum(table, axis=0)[:-1])
                sets.append(np.tri(m, self.width, dtype=bool)[:-1])
            left = np.concatenate(lefts)
            masks = np.concatenate(sets)
            right = total - left
            n_l, n_r = left.sum(1), right.sum(1)
            ok = (n_l >= cfg.min_samples_leaf) & (n_r >= cfg.min_samples_leaf)
            if not ok.any():
                continue
            imp = (n_l - (left**2).sum(1) / np.maximum(n_l, 1)) + (
                n_r - (right**2).sum(1) / np.maximum(n_r, 1)
            )
            imp[~ok] = np.inf
            i = int(np.argmin(imp))
            if best is None or imp[i] < best[0] - 1e-12:
                best = (float(imp[i]), j, masks[i])
        return best

    def grow_cart(self, rows: np.ndarray) -> None:
        """Grow a CART from ``rows``; the sensitive-feature rules of the config apply."""
        cfg = self.config
        d = self.X.shape[1]
        others = [j for j in range(d) if j != self.sensitive]
        stack = [(rows, self._new(rows, 0))]
        while stack:
            idx, node = stack.pop()
            depth = self.depth[node]
            counts = self.counts[node]
            n = idx.size
            if (
                (cfg.max_depth is not None and depth >= cfg.max_depth)
                or n < cfg.min_samples_split
                or (counts > 0).sum() <= 1
            ):
                continue
            parent_imp = n - float((counts**2).sum()) / n
            best = None
            if self.sensitive is not None and depth == cfg.sensitive_depth:
                best = self._candidates(idx, [self.sensitive])  # forced, whatever the gain
            if best is None:
                use_all = self.sensitive is None or (
                    cfg.sensitive_depth is None and not cfg.exclude_sensitive
                )
                best = self._candidates(idx, range(d) if use_all else others)
                if best is None or best[0] >= parent_imp - 1e-9:
                    continue
            _, j, mask = best
            go_left = mask[self.X[idx, j]]
            self._split(node, j, mask, idx[go_left], idx[~go_left], stack)

    def _split(
        self,
        node: int,
        j: int,
        mask: np.ndarray,
        left_rows: np.ndarray,
        right_rows: np.ndarray,
        stack: list[tuple[np.ndarray, int]],
    ) -> None:
        depth = self.depth[node] + 1
        left = self._new(left_rows, depth)
        right = self._new(right_rows, depth)
        self.feature[node] = j
        self.left_set[node] = mask.copy()
        self.children[node] = [left, right]
        stack.extend([(right_rows, right), (left_rows, left)])

    def grow_random(self, rows: np.ndarray, epsilon: float, rng: np.random.Generator) -> None:
        """DP tree: data-independent random splits, Laplace(1/eps) noise on leaf counts."""
        depth_limit = self.config.dp_depth
        d = self.X.shape[1]
        features = [j for j in range(d) if self.sizes[j] > 1]
        stack = [(rows, self._new(rows, 0))]
        leaves = []
        while stack:
            idx, node = stack.pop()
            if self.depth[node] >= depth_limit:
                leaves.append(node)
                continue
            j = int(rng.choice(features))
            m = int(self.sizes[j])
            mask = np.zeros(self.width, dtype=bool)
            if self.ordered[j]:
                mask[: int(rng.integers(1, m))] = True
            else:
                mask[int(rng.integers(m))] = True
            go_left = mask[self.X[idx, j]]
            self._split(node, j, mask, idx[go_left], idx[~go_left], stack)
        for leaf in leaves:
            noisy = self.counts[leaf] + rng.laplace(0.0, 1.0 / epsilon, size=self.k)
            self.counts[leaf] = np.maximum(noisy, 0.0)
        for node in sorted(range(len(self.feature)), key=lambda i: -self.depth[i]):
            left, right = self.children[node]
            if left >= 0:  # post-processing: internal counts from the noisy leaves
                self.counts[node] = self.counts[left] + self.counts[right]


class DecisionTreeTarget:
    """A fitted categorical CART that answers labels, leaf distributions and confidences.

    Implements the ``Target``, ``Confident`` and ``Tabular`` protocols. Inputs are
    encoded rows (see :mod:`mlinvert.data.surveys`): float32 category codes ``(n, d)``.
    """

    kind = "tree"

    def __init__(self, config: TreeConfig | None = None) -> None:
        self.config = config if config is not None else TreeConfig()
        self._fitted = False

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        feature_names: Sequence[str],
        domains: Sequence[Sequence[str]],
        class_names: Sequence[str],
        ordered: Sequence[bool] | None = None,
        sensitive: str | None = None,
        seed: Seed = None,
    ) -> DecisionTreeTarget:
        """Grow the tree on codes ``X`` and labels ``y`` (``seed`` only matters for DP)."""
        d = len(feature_names)
        if len(domains) != d:
            raise ConfigError("domains must have one entry per feature")
        if (self.config.sensitive_depth is not None or self.config.exclude_sensitive) and (
            sensitive is None
        ):
            raise ConfigError("a privacy-aware tree needs the sensitive feature name")
        if sensitive is not None and sensitive not in feature_names:
            raise ConfigError(f"sensitive feature {sensitive!r} is not among {list(feature_names)}")
        self.feature_names_ = tuple(feature_names)
        self.domains_ = tuple(tuple(str(c) for c in dom) for dom in domains)
        self.ordered_ = tuple(bool(o) for o in (ordered or [False] * d))
        self.class_names_ = tuple(class_names)
        self.classes_ = np.arange(len(self.class_names_), dtype=np.int64)
        self.input_shape_: tuple[int, ...] = (d,)
        self.sensitive_ = sensitive
        self._fitted = True
        Xc = self.check_input(X).astype(np.int64)
        y = np.asarray(y, dtype=np.int64)
        if y.shape != (Xc.shape[0],) or y.min() < 0 or y.max() >= len(self.class_names_):
            raise ConfigError("y must hold one class index per row, within class_names")
        sizes = np.array([len(dom) for dom in self.domains_])
        builder = _Builder(
            Xc,
            y,
            sizes,
            np.array(self.ordered_),
            len(self.class_names_),
            None if sensitive is None else self.feature_names_.index(sensitive),
            self.config,
        )
        rows = np.arange(Xc.shape[0])
        if self.config.dp_epsilon is not None:
            builder.grow_random(rows, self.config.dp_epsilon, rng_from(seed))
        else:
            builder.grow_cart(rows)
        self._set_arrays(
            np.array(builder.feature),
            np.array(builder.left_set),
            np.array(builder.children),
            np.array(builder.counts),
            np.array(builder.depth),
        )
        log.info("tree grown: %d nodes, depth %d", self.n_nodes_, int(self.depth_.max()))
        return self

    def _set_arrays(
        self,
        feature: np.ndarray,
        left_set: np.ndarray,
        children: np.ndarray,
        counts: np.ndarray,
        depth: np.ndarray,
    ) -> None:
        self.feature_ = feature.astype(np.int64)
        self.left_set_ = left_set.astype(bool)
        self.children_left_ = children[:, 0].astype(np.int64)
        self.children_right_ = children[:, 1].astype(np.int64)
        self.counts_ = counts.astype(np.float64)
        self.depth_ = depth.astype(np.int64)

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError("the tree is not fitted; call fit(...) or train_tree(...)")

    @property
    def n_nodes_(self) -> int:
        """Number of nodes."""
        return int(self.feature_.shape[0])

    # ------------------------------------------------------------------ answers
    def apply(self, X: np.ndarray) -> np.ndarray:
        """Leaf index of every row (vectorised: one step per tree level)."""
        self._check_fitted()
        codes = np.asarray(X).astype(np.int64)
        node = np.zeros(codes.shape[0], dtype=np.int64)
        rows = np.arange(codes.shape[0])
        while rows.size:
            feat = self.feature_[node[rows]]
            inner = feat >= 0
            rows, feat = rows[inner], feat[inner]
            if not rows.size:
                break
            here = node[rows]
            go_left = self.left_set_[here, codes[rows, feat]]
            node[rows] = np.where(go_left, self.children_left_[here], self.children_right_[here])
        return node

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """The class distribution of each row's leaf (uniform for an empty DP leaf)."""
        counts = self.counts_[self.apply(X)]
        total = counts.sum(axis=1, keepdims=True)
        k = counts.shape[1]
        return np.where(total > 0, counts / np.maximum(total, 1e-12), 1.0 / k)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Majority class of each row's leaf."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    def confidence(self, X: np.ndarray) -> np.ndarray:
        """BigML confidence: Wilson lower bound (z = 1.96) of the predicted class's share."""
        counts = self.counts_[self.apply(X)]
        return wilson_lower(counts.max(axis=1), counts.sum(axis=1))

    # ------------------------------------------------------------------ tabular
    def encode_records(self, records: list[dict[str, Any]]) -> np.ndarray:
        """Encode ``{feature: category}`` records; QueryRejected names the bad field."""
        self._check_fitted()
        return _encode_records(records, self.feature_names_, self.domains_, error=QueryRejected)

    def check_input(self, X: np.ndarray) -> np.ndarray:
        """Validate a batch of codes ``(n, d)`` and return it as float32."""
        self._check_fitted()
        x = np.asarray(X)
        d = len(self.feature_names_)
        if x.ndim != 2 or x.shape[1] != d:
            raise QueryRejected(f"expected encoded rows of shape (n, {d}), got {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise QueryRejected(f"encoded rows must be numbers, got dtype {x.dtype}")
        x = x.astype(np.float32)
        sizes = np.array([len(dom) for dom in self.domains_])
        bad = ~np.isfinite(x) | (x != np.round(x)) | (x < 0) | (x >= sizes)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise QueryRejected(
                f"row {i}: field {self.feature_names_[j]!r} has code {x[i, j]!r}; expected an "
                f"integer category code 0..{sizes[j] - 1} ({', '.join(self.domains_[j])})"
            )
        return x

    # ------------------------------------------------------------------ structure
    def allowed(self, feature: str) -> np.ndarray:
        """``(n_nodes, |domain|)`` bool: categories of ``feature`` consistent with each path."""
        self._check_fitted()
        j = self.feature_names_.index(feature)
        m = len(self.domains_[j])
        out = np.ones((self.n_nodes_, m), dtype=bool)
        for node in np.argsort(self.depth_, kind="stable"):
            left, right = self.children_left_[node], self.children_right_[node]
            if left < 0:
                continue
            out[left] = out[node]
            out[right] = out[node]
            if self.feature_[node] == j:
                out[left] &= self.left_set_[node, :m]
                out[right] &= ~self.left_set_[node, :m]
        return out

    def to_document(self) -> dict[str, Any]:
        """The white-box "downloadable model": features, splits and counts at every node.

        ``nodes[i]`` has ``depth``, ``counts`` (training count per class, in the order
        of ``classes``), and for internal nodes ``split = {"feature", "left"}`` (the
        categories that go to ``children[0]``) and ``children = [left, right]``.
        """
        self._check_fitted()
        nodes = []
        for i in range(self.n_nodes_):
            node: dict[str, Any] = {
                "depth": int(self.depth_[i]),
                "counts": [float(c) for c in self.counts_[i]],
            }
            j = int(self.feature_[i])
            if j >= 0:
                dom = self.domains_[j]
                node["split"] = {
                    "feature": self.feature_names_[j],
                    "left": [c for c, on in zip(dom, self.left_set_[i], strict=False) if on],
                }
                node["children"] = [int(self.children_left_[i]), int(self.children_right_[i])]
            nodes.append(node)
        return {
            "format": DOCUMENT_FORMAT,
            "kind": self.kind,
            "features": [
                {"name": n, "categories": list(dom), "ordered": o}
                for n, dom, o in zip(self.feature_names_, self.domains_, self.ordered_, strict=True)
            ],
            "classes": list(self.class_names_),
            "sensitive": self.sensitive_,
            "config": asdict(self.config),
            "nodes": nodes,
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> DecisionTreeTarget:
        """Rebuild a tree from :meth:`to_document` output (ModelError if malformed)."""
        try:
            if doc.get("format") != DOCUMENT_FORMAT:
                raise ModelError(
                    f"expected a {DOCUMENT_FORMAT} document, got format {doc.get('format')!r}"
                )
            model = cls(TreeConfig(**doc["config"]))
            feats = doc["features"]
            model.feature_names_ = tuple(str(f["name"]) for f in feats)
            model.domains_ = tuple(tuple(str(c) for c in f["categories"]) for f in feats)
            model.ordered_ = tuple(bool(f["ordered"]) for f in feats)
            model.class_names_ = tuple(str(c) for c in doc["classes"])
            model.classes_ = np.arange(len(model.class_names_), dtype=np.int64)
            model.input_shape_ = tuple([len(feats)])
            model.sensitive_ = doc.get("sensitive")
            index = {n: j for j, n in enumerate(model.feature_names_)}
            width = max(len(dom) for dom in model.domains_)
            nodes = doc["nodes"]
            n = len(nodes)
            feature = np.full(n, -1, dtype=np.int64)
            left_set = np.zeros((n, width), dtype=bool)
            children = np.full((n, 2), -1, dtype=np.int64)
            for i, node in enumerate(nodes):
                split = node.get("split")
                if split is not None:
                    j = index[split["feature"]]
                    feature[i] = j
                    cats = {c: k for k, c in enumerate(model.domains_[j])}
                    left_set[i, [cats[c] for c in split["left"]]] = True
                    children[i] = node["children"]
            counts = np.array([node["counts"] for node in nodes], dtype=np.float64)
            depth = np.array([node["depth"] for node in nodes], dtype=np.int64)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelError(f"malformed tree document: {exc!r}") from exc
        if counts.shape != (n, len(model.class_names_)) or (children >= n).any():
            raise ModelError("malformed tree document: counts or children out of shape")
        model._set_arrays(feature, left_set, children, counts, depth)
        model._fitted = True
        return model

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Model-folder state: no tensors, the whole tree in the JSON params."""
        return {}, self.to_document()

    @classmethod
    def from_state(
        cls, tensors: dict[str, np.ndarray], params: dict[str, Any]
    ) -> DecisionTreeTarget:
        """Inverse of :meth:`get_state`."""
        del tensors  # the tree lives entirely in the params
        return cls.from_document(params)


def train_tree(
    dataset: SurveyDataset,
    *,
    seed: Seed = 0,
    config: TreeConfig | None = None,
    quick: bool = False,
) -> tuple[DecisionTreeTarget, dict[str, Any]]:
    """Fit a tree on the members of ``dataset``; return ``(model, card)``.

    The card holds the data spec, split, config, seed, node count, depth, and the
    accuracy on members (training) and non-members (held out). ``quick`` caps the depth
    at 8 (for tests).
    """
    if config is None:
        config = TreeConfig(max_depth=8) if quick else TreeConfig()
    X, y = dataset.members()
    model = DecisionTreeTarget(config).fit(
        X,
        y,
        feature_names=dataset.feature_names,
        domains=dataset.domains,
        class_names=dataset.class_names,
        ordered=dataset.ordered,
        sensitive=dataset.sensitive,
        seed=seed,
    )
    Xt, yt = dataset.nonmembers()
    card = {
        **card_base(model),
        "dataset": dataset.spec,
        "split": dataset.split.to_dict(),
        "seed": seed if isinstance(seed, int) else None,
        "config": asdict(config),
        "sensitive": dataset.sensitive,
        "n_nodes": model.n_nodes_,
        "depth": int(model.depth_.max()),
        "train_accuracy": float((model.predict(X) == y).mean()),
        "test_accuracy": float((model.predict(Xt) == yt).mean()) if yt.size else None,
    }
    return model, card
