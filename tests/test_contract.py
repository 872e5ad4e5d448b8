"""The contract between producer and workers has one owner (contract/), and the producer stays torch-free:
every module of producer/, contract/ and reconciler/ imports in a fresh interpreter without torch, transformers
or any module of workers/, builds no Celery app and connects no worker signal handler."""
from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest
import redis
from click.testing import CliRunner

import contract
import producer
import reconciler
from contract.broker import Sender, connect, make_app
from contract.errors import BrokerUnreachable
from contract.messages import GENERATE_TASK, BadMessage, decode, decode_kombu, encode, queue_name
from producer.cli import main
from tests.helpers import ROOT

HEAVY = ("torch", "transformers", "accelerate", "torchao")


def _modules(package) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."))


MODULES = ["producer", "contract", "reconciler", *_modules(producer), *_modules(contract), *_modules(reconciler)]

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {heavy} or m == "workers" or m.startswith("workers."))
receivers = 0
if "celery.signals" in sys.modules:
    from celery import signals
    receivers = sum(len(getattr(signals, name).receivers or []) for name in ("celeryd_init", "worker_process_init",
        "worker_ready", "worker_shutdown", "after_setup_logger", "after_setup_task_logger", "worker_process_shutdown"))
apps = 0
if "celery._state" in sys.modules:
    from celery import _state
    apps = len(list(_state._get_active_apps()))
print(json.dumps({{"loaded": loaded, "receivers": receivers, "apps": apps}}))
""".format(heavy=set(HEAVY))


def test_the_walk_finds_every_module() -> None:
    """The list below is walked, not written: it must hold the modules this test was written against."""
    assert {"producer.api", "producer.cli", "producer.inputs", "producer.commands.submit", "contract.broker",
            "contract.messages", "reconciler.sweep", "reconciler.metrics", "contract.registry", "contract.settings", "contract.errors"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_importing_loads_no_torch_no_workers_and_no_celery_app(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, module], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["loaded"] == [], f"importing {module} loads {found['loaded']}"
    assert found["receivers"] == 0, f"importing {module} connects {found['receivers']} worker signal handlers"
    assert found["apps"] == 0, f"importing {module} builds a Celery app"


LIGHT_PROBE = """
import sys
sys.argv = {argv!r}
try:
    {run}
except SystemExit:
    pass
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"sqlalchemy", "pydantic", "pydantic_settings", "celery",
      "kombu", "redis", "rich", "pyarrow", "torch", "transformers"}}))
"""


@pytest.mark.parametrize("what", ["import producer.api", "producer submit --help"])
def test_starting_the_api_or_a_command_loads_nothing_heavy(what: str) -> None:
    """What makes `import producer.api` and `producer submit --help` start in a fraction of a second (figures
    in docs/benchmarks.md): neither SQLAlchemy nor pydantic nor Celery is imported until a call needs it."""
    if what.startswith("import"):
        probe = LIGHT_PROBE.format(argv=["-c"], run=what)
    else:
        probe = LIGHT_PROBE.format(argv=what.split(), run="from producer.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout or what.startswith("import")
    assert done.stdout.strip().splitlines()[-1] == "[]"


# --- who may import whom (docs/architecture.md) -------------------------------------------------------

OURS = ("contract", "models", "reconciler", "migrations", "producer", "workers")
MAY_LOAD = {
    "contract": {"contract"},  # a leaf
    "models": {"models", "contract"},  # the tables, the store's queries; contract.policy (why a request gave up)
    "reconciler": {"reconciler", "contract", "models"},  # the sweep reads and marks requests through models/
}
"""Which of our packages importing each module of a package may load: anything else breaks the import rule."""
STACK = ("pydantic", "pydantic_settings", "celery", "kombu", "redis", "alembic", "prometheus_client", "torch")
"""Libraries that importing a module of models/ loads none of: it needs SQLAlchemy alone."""
RULE_MODULES = [name for package in MAY_LOAD for name in (package, *_modules(importlib.import_module(package)))]

RULE_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {ours} | {stack})))
""".format(ours=set(OURS), stack=set(STACK))


def test_the_import_rule_covers_every_package_it_names() -> None:
    assert {"contract.policy", "contract.redis_acl", "models.db", "models.store", "models.tables", "reconciler.sweep",
            "reconciler.metrics"} <= set(RULE_MODULES)
    assert (ROOT / "migrations" / "schema.py").is_file() and not (ROOT / "contract" / "reconcile.py").exists()


@pytest.mark.parametrize("module", RULE_MODULES)
def test_each_package_loads_only_what_the_import_rule_allows(module: str) -> None:
    """contract/ is a leaf: it loads no module of models/, producer/, workers/, migrations/ or reconciler/. models/
    loads only contract/ (and SQLAlchemy: none of the stack above it), never producer/, workers/, migrations/ (whose
    env.py imports models/) or reconciler/. reconciler/ loads contract/ and models/, never producer/ or workers/."""
    done = subprocess.run([sys.executable, "-c", RULE_PROBE, module], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    package = module.split(".")[0]
    ours = {m for m in loaded if m.split(".")[0] in OURS}
    beyond = sorted(m for m in ours if m.split(".")[0] not in MAY_LOAD[package])
    assert beyond == [], f"importing {module} loads {beyond}"
    if package == "models":
        stack = sorted({m.split(".")[0] for m in loaded} - set(OURS))
        assert stack == [], f"importing {module} loads {stack}"


def test_the_worker_app_is_where_celery_looks_for_it() -> None:
    """`celery -A workers.app worker|flower` (workers start, compose.yaml) finds the app with the task registered."""
    done = subprocess.run(
        [sys.executable, "-c", "import workers.app as m, workers.tasks; print(sorted(t for t in m.app.tasks if t.startswith('bulkgen.')))"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([GENERATE_TASK])


# --- the envelope: one encode, one decode -----------------------------------------------------------

def test_an_envelope_decodes_to_what_was_encoded() -> None:
    message = decode(encode(7, [3, 1, 3, 2]))
    assert (message.job_id, message.request_ids) == (7, [3, 1, 2])  # in order, a duplicate dropped


@pytest.mark.parametrize("args", [[7], [7, [1], 3], ["7", [1]], [7, "1,2"], [7, [1, "2"]], [True, [1]], [7, [1.5]], None, {"job_id": 7}])
def test_a_malformed_envelope_is_refused(args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadMessage):
        decode(args)


def test_what_the_sender_puts_in_redis_decodes_there(broker_url: str) -> None:
    app = make_app(broker_url)
    queue = queue_name("some/model:v1")
    assert queue == "gen.some_model_v1"
    with Sender(app) as send:
        send(queue, 5, [10, 11, 12])
        send(queue, 5, [13])
    raw = redis.Redis.from_url(broker_url).lrange(queue, 0, -1)
    decoded = sorted((e.job_id, e.request_ids) for e in (decode_kombu(json.loads(m)) for m in raw) if e is not None)
    assert decoded == [(5, [10, 11, 12]), (5, [13])]
    assert decode_kombu({"headers": {"task": "other.task"}, "body": ""}) is None


# --- errors: raised by the library, one clean line from the CLI -------------------------------------

def test_the_errors_raised_on_purpose_outside_contract_errors_are_bulkgen_errors_too() -> None:
    from contract.errors import BulkgenError, WrongModel
    from contract.policy import TransientError

    assert issubclass(TransientError, BulkgenError) and issubclass(WrongModel, BulkgenError)
    assert issubclass(BadMessage, BulkgenError) and issubclass(BadMessage, ValueError)  # decode_kombu catches ValueError
    assert issubclass(WrongModel, RuntimeError)  # what the worker raised before


def test_an_unreachable_broker_is_one_line_without_its_password(sqlite_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import free_port

    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    with pytest.raises(BrokerUnreachable) as caught:
        connect(broker_url=url)
    assert "s3cret-pw" not in str(caught.value) and "cannot reach the broker" in str(caught.value)

    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    result = CliRunner().invoke(main, ["submit", str(path), "--model", "stand-in", "--database-url", sqlite_url, "--broker-url", url])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "s3cret-pw" not in result.output
    assert "Error: cannot reach the broker redis://:***@127.0.0.1" in result.output


def test_an_unknown_job_and_an_old_schema_are_clean_errors(sqlite_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for args in (["status", "999"], ["cancel", "999"], ["results", "999"]):
        result = CliRunner().invoke(main, [*args, "--database-url", sqlite_url])
        assert (result.exit_code, result.output.strip()) == (1, "Error: no job 999"), args
    blank = f"sqlite:///{tmp_path / 'blank.db'}"
    result = CliRunner().invoke(main, ["jobs", "--database-url", blank])
    assert result.exit_code == 1 and "has no schema yet" in result.output and "producer db upgrade" in result.output


# --- a producer-only install ------------------------------------------------------------------------

def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower().replace("_", "-")


def _closure(names: set[str]) -> set[str]:
    """These distributions and everything they require (without extras), as installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name.lower().replace("_", "-"))
    return seen


def test_a_producer_only_install_needs_no_worker_dependency() -> None:
    """The base dependencies hold no part of the worker's stack, and every distribution the producer's and the
    contract's modules load, all imported together, is one of them or something they require."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(d) for d in project["dependencies"]}
    worker = {_name(d) for d in project["optional-dependencies"]["worker"]}
    assert not base & {"torch", "transformers", "accelerate", "gguf", "torchao"}
    assert {"transformers", "accelerate", "gguf", "torchao"} <= worker
    assert "bulkgen[worker]" in project["optional-dependencies"]["test"]  # make install / make test get everything

    probe = (
        "import importlib, json, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    allowed = _closure(base)
    needed = {
        dist.lower().replace("_", "-")
        for top in json.loads(done.stdout.strip().splitlines()[-1])
        for dist in owners.get(top, [])
    } - {"bulkgen"}
    assert needed, "the probe found no distribution at all"
    assert needed <= allowed, f"loaded, but not installed by a producer-only install: {sorted(needed - allowed)}"
