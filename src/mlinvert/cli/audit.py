"""``mlinvert audit``: attack a model under every defence and write an HTML report."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from mlinvert.cli.common import (
    HEADER,
    OUTPUT,
    PROTOCOL,
    REQUEST,
    SCORES,
    check_seed,
    console,
    on_interrupt,
    out,
    wire_config,
)
from mlinvert.errors import ConfigError

if TYPE_CHECKING:
    from mlinvert.audit.config import AuditConfig


def _split(value: str | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise ConfigError(f"--{what} is empty; give a comma-separated list")
    return items


class _Display:
    """Rich progress: a stage spinner, the audit bar and the current attack's queries."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.stage = progress.add_task("starting", total=None)
        self.audit: Any = None
        self.attack: Any = None

    def __call__(self, kind: str, data: Mapping[str, Any]) -> None:
        p = self.progress
        if kind == "stage":
            p.update(self.stage, description=str(data["name"]))
        elif kind == "plan":
            self.audit = p.add_task("attack runs", total=data["total"], completed=data["done"])
        elif kind == "attack_progress":
            if self.attack is None:
                self.attack = p.add_task("queries of this attack", total=None)
            p.update(self.attack, completed=data["queries"], total=data["budget"])
        elif kind == "record":
            if self.audit is not None:
                p.advance(self.audit)
            p.update(
                self.stage,
                description=f"{data['target_model']} · {data['defense']} · {data['attack']} · "
                f"{data['label_name']}: {data['status']}",
            )
            if self.attack is not None:
                p.reset(self.attack, total=None)


#: Environment variables that may hold the --api-key and --utility-key values (kept out
#: of ``ps`` and the shell history).
_KEY_ENV = "MLINVERT_AUDIT_API_KEY"
_UTILITY_KEY_ENV = "MLINVERT_AUDIT_UTILITY_KEY"
#: Options whose values are secrets.
_SECRET_OPTIONS = ("--api-key", "--utility-key", "--header")  # a header may carry a token


def _redacted(command: str) -> str:
    """The command line with the values of ``--api-key``, ``--utility-key`` and
    ``--header`` hidden."""
    import shlex

    parts = shlex.split(command)
    for i, part in enumerate(parts):
        if part in _SECRET_OPTIONS and i + 1 < len(parts):
            parts[i + 1] = "***"
        elif part.startswith(tuple(f"{o}=" for o in _SECRET_OPTIONS)):
            parts[i] = part.split("=", 1)[0] + "=***"
    return shlex.join(parts)


#: Exit code of an audit that finished with cells it could not measure (an attack raised
#: an error or the judge failed): its report must not be read as the defences working.
EXIT_UNMEASURED = 3


def _summary(index: Path) -> int:
    """Print the verdict table; return how many records could not be measured."""
    from mlinvert.report.html import load_results
    from mlinvert.report.summary import faces_judged, verdicts

    results = load_results(index.parent)
    if results.get("tree_audit"):
        _tree_summary(results["tree_audit"])
        return 0
    faces = faces_judged(results)
    judge = "independent face recogniser" if faces else "evaluation model"
    table = Table(
        title=f"model inversion audit: verdict per defence (strongest API attack; judge: {judge})"
    )
    for col in (
        "target",
        "defence",
        "verdict",
        "recovered",
        "attack acc." if faces else "eval top-1",
        "lineup",
        "median queries",
        "served acc.",
    ):
        table.add_column(
            col, justify="left" if col in ("target", "defence", "verdict") else "right"
        )
    for v in verdicts(results):
        colour = {
            "exposed": "red",
            "identity leaks": "yellow",
            "mitigated": "green",
            "not measured": "magenta",
        }.get(v.level, "white")
        table.add_row(
            v.target_model,
            v.defense,
            f"[{colour}]{v.level}[/]",
            f"{100 * v.api_recovered:.0f} %",
            f"{100 * v.api_identity:.0f} %",
            f"{100 * v.api_lineup:.0f} %",
            "n/a" if v.api_queries is None else f"{v.api_queries:,.0f}",
            "n/a" if v.accuracy is None else f"{100 * v.accuracy:.1f} %",
        )
    out.print(table)
    unmeasured = [r for r in results.get("records", []) if not r.get("measured", True)]
    if unmeasured:
        console.print(
            f"[bold magenta]{len(unmeasured)} attack run(s) could not be measured[/] (first: "
            f"{unmeasured[0].get('error')}); their defences read 'not measured'. Fix the cause "
            f"and run the same command with --resume (exit code {EXIT_UNMEASURED})."
        )
    return len(unmeasured)


def _tree_summary(tree: dict[str, Any]) -> None:
    """Survey audits: each estimator's accuracy on members vs non-members per defence."""
    table = Table(title="attribute inversion of the sensitive answer (members vs non-members)")
    for col in ("defence", "estimator", "channel", "members acc.", "non-members acc.", "queries"):
        table.add_column(
            col, justify="left" if col in ("defence", "estimator", "channel") else "right"
        )
    rows = [r for r in tree.get("records", []) if r.get("population") == "members"]
    for r in rows:
        other = next(
            (
                o
                for o in tree["records"]
                if o.get("population") == "non-members"
                and o.get("estimator") == r.get("estimator")
                and o.get("defense") == r.get("defense")
                and o.get("dataset") == r.get("dataset")
            ),
            None,
        )
        table.add_row(
            str(r.get("defense")),
            str(r.get("estimator")),
            str(r.get("channel", "")),
            f"{100 * r['accuracy']:.1f} %",
            "–" if other is None else f"{100 * other['accuracy']:.1f} %",
            f"{r.get('n_queries', 0):,}",
        )
    out.print(table)


_Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Data spec: digits (default; with --model, the data set its card names), "
        "att:PATH, folder:PATH, olivetti; survey specs steak:PATH, gss:PATH, fair run the "
        "decision-tree audit. Required with --api (the owner's data: the judge and the "
        "attacker's prior).",
    ),
]
_Model = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="Audit an existing model instead of training: a folder from `mlinvert train`, "
        "or a file (.onnx, .pt TorchScript, .joblib / .skops scikit-learn; with --data, "
        "whose images and classes it reads; a decision tree's file with survey --data).",
    ),
]
_Targets = Annotated[
    str,
    typer.Option(
        "--targets",
        help="Target kinds to train (comma-separated); KIND@dp:EPS trains that kind by "
        "DP-SGD at privacy budget EPS (softmax, mlp), audited beside the others.",
    ),
]
_Attacks = Annotated[
    str | None,
    typer.Option("--attacks", help="Subset of whitebox,blackbox,label-only (default: all)."),
]
_Defenses = Annotated[
    str | None,
    typer.Option(
        "--defenses",
        help="Comma-separated defences, e.g. none,round:2,top:1,labels,rate:500/hour,"
        "detect:block (default: none, round:3, round:2, round:1, top:1, labels, a rate limit, "
        "detect:block).",
    ),
]
_Labels = Annotated[
    int | None,
    typer.Option("--labels", help="Attack only the first N classes (default: every class)."),
]
_Budget = Annotated[
    int | None,
    typer.Option("--budget", help="API queries per attack per person (default: preset by size)."),
]
_Seed = Annotated[int, typer.Option("--seed", help="Seed of training, attacks and evaluation.")]
_OutDir = Annotated[Path, typer.Option("--out", help="Output folder.")]
_InProcess = Annotated[
    bool,
    typer.Option("--in-process", help="Query through LocalOracle instead of the HTTP service."),
]
_Resume = Annotated[bool, typer.Option("--resume", help="Continue a partial run in --out.")]
_Quick = Annotated[bool, typer.Option("--quick", help="Tiny training settings (smoke tests).")]
_Lanes = Annotated[
    int | None,
    typer.Option(
        "--lanes",
        help="People one API attack attacks at once; their probes share each request "
        "(default 8; 1 = one person after another).",
    ),
]
_Blind = Annotated[
    float | None,
    typer.Option(
        "--blind",
        help="Query blinding the API attacker uses under a defence with a query detector: "
        "fresh uniform noise of +-A on every probe (default 0.05; 0 = a naive attacker "
        "who does not adapt).",
    ),
]
_Accounts = Annotated[
    int,
    typer.Option(
        "--accounts",
        help="API accounts each API attack may open: when the service refuses one (rate "
        "limited or blocked) the attacker continues through a fresh key (default 1).",
    ),
]
_Escalate = Annotated[
    bool,
    typer.Option(
        "--escalate",
        help="With --blind and --accounts N: double the blinding noise each time the "
        "service blocks one of the attacker's accounts (stealthier, noisier probes).",
    ),
]
_Api = Annotated[
    str | None,
    typer.Option(
        "--api",
        help="Audit a prediction API that is already running: "
        "http://HOST:PORT/v1/models/NAME of an mlinvert-compatible service, or with "
        "--protocol v2 an Open Inference Protocol model http://HOST:PORT/v2/models/NAME, or "
        "with --protocol rest any JSON API (no service started, no target trained; "
        "black-box and label-only attacks under the one defence it advertises). Needs "
        "--data, and --api-key for mlinvert's API. With --cluster: several comma-separated "
        "URLs of the same model (replicas behind one Redis) that the tasks spread over.",
    ),
]
_ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="With --api: the attacker's API key(s) of that service, comma-separated; "
        "several are rotated through like --accounts (the first also measures the served "
        "accuracy unless --utility-key is given). Also read from MLINVERT_AUDIT_API_KEY. "
        "Never written to the results.",
        envvar=_KEY_ENV,
    ),
]
_UtilityKey = Annotated[
    str | None,
    typer.Option(
        "--utility-key",
        help="With --api: the key of an honest client, another account than the "
        "attacker's, that measures the served accuracy (so those queries do not count "
        "against the attacker's first key). Also read from MLINVERT_AUDIT_UTILITY_KEY. "
        "Never written to the results.",
        envvar=_UTILITY_KEY_ENV,
    ),
]
_Prior = Annotated[
    Path | None,
    typer.Option(
        "--prior",
        help="The attacker's face prior: a folder written by `mlinvert prior train` (faces "
        "learned from public photos of other people; refused if it holds a private photo). "
        "Default: eigenfaces of the other attacked people's held-out photos.",
    ),
]
_Cluster = Annotated[
    str | None,
    typer.Option(
        "--cluster",
        help="Run the attacks on a Dask cluster: local:N (N worker processes here) or "
        "tcp://HOST:PORT (a running scheduler whose workers see --out at the same path). "
        "Records are the same as on one machine; a lost worker's task is re-run, replaying "
        "the answers the service already gave.",
    ),
]
_GroupSize = Annotated[
    int | None,
    typer.Option(
        "--group-size",
        help="With --cluster: the most people of one task where the defence keeps no "
        "per-account state (output policies alone, and the white-box attack); each task "
        "keeps at least --lanes people. Under a rate limit or detector one task attacks "
        "all of an attack's people, as one machine's attacker does (default 16).",
    ),
]
_Replicas = Annotated[
    int,
    typer.Option(
        "--replicas",
        help="With --cluster: service processes per defence, behind one Redis that holds "
        "their shared rate limits and detector history; the tasks spread over them.",
    ),
]


def audit(
    data: _Data = None,
    model: _Model = None,
    targets: _Targets = "softmax,mlp",
    attacks: _Attacks = None,
    defenses: _Defenses = None,
    labels: _Labels = None,
    budget: _Budget = None,
    seed: _Seed = 0,
    out_dir: _OutDir = Path("runs/audit"),
    in_process: _InProcess = False,
    resume: _Resume = False,
    quick: _Quick = False,
    lanes: _Lanes = None,
    blind: _Blind = None,
    accounts: _Accounts = 1,
    escalate: _Escalate = False,
    api: _Api = None,
    api_key: _ApiKey = None,
    utility_key: _UtilityKey = None,
    prior: _Prior = None,
    cluster: _Cluster = None,
    replicas: _Replicas = 1,
    group_size: _GroupSize = None,
    protocol: str = PROTOCOL,
    output: str | None = OUTPUT,
    request: str | None = REQUEST,
    scores: str | None = SCORES,
    header: list[str] | None = HEADER,
) -> None:
    """Attack the model under every defence, measure, and write DIR/index.html.

    Exit codes: 0 every cell measured; 2 a configuration or data error (nothing
    measured); 3 the audit finished but some attack runs could not be measured (their
    defences read "not measured"); 130 interrupted.
    """
    import os

    from mlinvert.audit.config import DEFAULT_BLIND, DEFAULT_LANES, AuditConfig
    from mlinvert.audit.runner import command_line
    from mlinvert.core import API_ATTACKS, ATTACKS

    if api is None and api_key is not None and api_key != os.environ.get(_KEY_ENV):
        raise ConfigError("--api-key is for --api (auditing a deployed API); give --api URL")
    if api is None and utility_key == os.environ.get(_UTILITY_KEY_ENV):
        utility_key = None  # only the environment set it: ignored without --api
    check_seed(seed)
    config = AuditConfig(
        # with --model and no --data: the data set the model card names
        data=data if (data is not None or api is not None or model is not None) else "digits",
        model_dir=model,
        targets=_split(targets, "targets") or (),
        attacks=_split(attacks, "attacks") or (API_ATTACKS if api is not None else ATTACKS),
        defenses=_split(defenses, "defenses"),
        labels=labels,
        budget=budget,
        seed=seed,
        out=out_dir,
        in_process=in_process,
        resume=resume,
        quick=quick,
        lanes=DEFAULT_LANES if lanes is None else lanes,
        blind=DEFAULT_BLIND if blind is None else blind,
        accounts=accounts,
        escalate=escalate,
        api=api,
        api_keys=_split(api_key, "api-key") or (),
        utility_key=utility_key,
        prior=prior,
        cluster=cluster,
        replicas=replicas,
        group_size=group_size,
        wire=wire_config(protocol, output, request, scores, header),
        command=_redacted(command_line()),
    )
    _run(config)


def _run(config: AuditConfig) -> None:
    """Run the audit with a progress display, print the verdicts, exit 3 if unmeasured."""
    from mlinvert.audit.runner import run_audit

    out_dir = config.out
    with (
        on_interrupt(
            f"{out_dir / 'results.json'} keeps the finished attack runs (partial report: "
            f"{out_dir / 'index.html'}); run the same command with --resume to continue"
        ),
        Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress,
    ):
        index = run_audit(config, events=_Display(progress))
    unmeasured = _summary(index)
    console.print(f"report: [bold]{index}[/]  (results: {index.parent / 'results.json'})")
    if unmeasured:
        raise typer.Exit(EXIT_UNMEASURED)


def register(app: typer.Typer) -> None:
    """Add ``audit`` to the CLI."""
    app.command("audit")(audit)
