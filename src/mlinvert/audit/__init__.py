"""The audit: attack a model under every defence, measure, write ``results.json``.

For each target model and each defence of the matrix (none; rounding to 3, 2 and 1
decimals; top-1 score only; labels only; a per-account rate limit; a query detector
that blocks an account sending near-duplicate inputs) the audit runs the
attack suite on every attacked person — white-box MI-Face (the attacker holds the
weights), black-box MI-Face and label-only inversion (both through the prediction API
with a fresh API key) — judges each reconstruction (on faces the independent face
recogniser, beside the evaluation model and likeness of
:class:`~mlinvert.evaluation.faces.FaceJudge`), measures what each defence
costs honest users, and writes every record to ``results.json`` as soon as it exists
(atomic rewrite), so an interrupted run leaves a valid partial file that ``resume``
continues. The schema is documented in ``docs/results-schema.md``.

With ``AuditConfig.api`` the audit targets a prediction API that is already deployed
instead: no service is started and no model trained; the API attacks run through the
attacker's own keys under the one defence the endpoint advertises, judged against the
owner's data (:mod:`mlinvert.audit.deployed`).

The rooms: ``config`` (what a run is asked to do), ``results`` (``results.json``,
typed records, resume rules), ``runner`` (``run_audit``), ``faces``, ``matrix``,
``records``, ``channels``, ``deployed``, ``trees``; see ``docs/architecture.md``.

Threat mapping: OWASP ML03:2023 (Model Inversion), MITRE ATLAS AML.T0024.001 (Invert
ML Model via the inference API). Attacks after Fredrikson, Jha, Ristenpart, CCS 2015.
"""

from mlinvert.audit.config import AuditConfig
from mlinvert.audit.runner import run_audit

__all__ = ["AuditConfig", "run_audit"]
