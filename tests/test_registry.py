"""Models as users hold them: a .gguf file, a directory, a path spelt several ways, a model this machine lacks."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from contract import gguf_meta
from contract.registry import (
    SMOLLM2,
    SMOLLM2_CONTEXT,
    SMOLLM2_GGUF,
    ModelNotFound,
    canonical_name,
    context_length,
    resolve,
    smollm2_dir,
)
from producer.cli import main
from tests.helpers import write_jsonl


def write_gguf(path: Path, architecture: str = "qwen2", context: int | None = 4096) -> Path:
    """A small but real GGUF file: the header the producer reads, a token list (an array to skip), one tensor."""
    writer = gguf.GGUFWriter(str(path), architecture)
    if context is not None:
        writer.add_context_length(context)
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_is_a_model_with_its_own_context_length(tmp_path: Path) -> None:
    file = write_gguf(tmp_path / "qwen.Q4_K_M.gguf", "qwen2", 32768)
    spec = resolve(str(file))
    assert (spec.kind, spec.path, spec.gguf_file, spec.context_length) == ("gguf", str(tmp_path), file.name, 32768)
    assert spec.name == str(file)
    assert context_length(str(file)) == 32768


def test_a_gguf_without_a_context_length_gets_what_transformers_assumes(tmp_path: Path) -> None:
    assert resolve(str(write_gguf(tmp_path / "m.gguf", context=None))).context_length == gguf_meta.DEFAULT_CONTEXT


def test_the_header_reader_agrees_with_the_gguf_package_on_smollm2() -> None:
    file = smollm2_dir() / SMOLLM2_GGUF
    ours = gguf_meta.read_metadata(file)
    theirs = gguf.GGUFReader(str(file))
    scalars = {k: f.contents() for k, f in theirs.fields.items()
               if not k.startswith("GGUF.") and f.types and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert ours.keys() == scalars.keys()
    for key, value in scalars.items():
        assert ours[key] == pytest.approx(value), key
    assert gguf_meta.context_length(file) == SMOLLM2_CONTEXT == ours["llama.context_length"]


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelNotFound, match="not a GGUF file"):
        resolve(str(bad))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(write_gguf(tmp_path / "whole.gguf").read_bytes()[:30])
    with pytest.raises(ModelNotFound, match="ends early"):
        resolve(str(truncated))


def test_a_directory_with_one_gguf_file_is_that_file(tmp_path: Path) -> None:
    file = write_gguf(tmp_path / "only.gguf")
    assert resolve(str(tmp_path)) == resolve(str(file))


def test_a_directory_with_several_gguf_files_is_refused_with_their_names(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.Q8_0.gguf")
    write_gguf(tmp_path / "m.Q4_K_M.gguf")
    with pytest.raises(ModelNotFound) as refused:
        resolve(str(tmp_path))
    assert "2 .gguf files (m.Q4_K_M.gguf, m.Q8_0.gguf)" in str(refused.value)
    assert "give the path of the one to load" in str(refused.value)


def test_one_model_has_one_name_and_queue_however_its_path_is_spelt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    spellings = ["m", "./m", "m/", "./m/", str(model), str(model) + "/", "link", str(tmp_path / "link")]
    specs = [resolve(name) for name in spellings]
    assert {s.name for s in specs} == {str(model)} == {canonical_name(n) for n in spellings}
    assert {s.queue for s in specs} == {specs[0].queue}
    assert specs[0].context_length == 1024

    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    file = write_gguf(gguf_dir / "one.gguf")
    assert {resolve(n).queue for n in ("g", "g/", "./g/one.gguf", str(file))} == {resolve(str(file)).queue}


def test_a_name_this_machine_does_not_hold_is_only_tidied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert canonical_name("/srv/models/qwen/") == "/srv/models/qwen"
    assert canonical_name("./qwen/") == "qwen"
    assert canonical_name("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert canonical_name(SMOLLM2) == SMOLLM2


def test_the_context_of_a_model_not_held_comes_from_the_user() -> None:
    with pytest.raises(ModelNotFound, match="--context-length"):
        context_length("/nowhere/qwen")
    assert context_length("/nowhere/qwen", 40960) == 40960


def _submit(store: str, broker: str, path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["submit", str(path), *args, "--database-url", store, "--broker-url", broker],
                                catch_exceptions=False)
    return result.exit_code, result.output


def test_a_producer_submits_for_a_model_it_does_not_hold(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "max_new_tokens": 50}, {"prompt": "yo", "max_new_tokens": 200}])
    code, output = _submit(sqlite_url, broker_url, path, "--model", "/srv/models/qwen/")
    assert code == 1 and "--context-length" in output and "Traceback" not in output

    code, output = _submit(sqlite_url, broker_url, path, "--model", "/srv/models/qwen/", "--context-length", "100")
    assert code == 1 and "in.jsonl:2: max_new_tokens: must be <= 100 (the model's context), got 200" in output

    code, output = _submit(sqlite_url, broker_url, path, "--model", "/srv/models/qwen/", "--context-length", "100",
                           "--skip-invalid")
    assert code == 0, output
    with create_engine(sqlite_url).connect() as c:
        assert c.execute(text("SELECT model FROM jobs")).scalars().all() == ["/srv/models/qwen"]
    assert redis.Redis.from_url(broker_url).llen("gen.srv_models_qwen") == 1


def test_a_job_for_a_local_path_is_stored_and_queued_under_its_canonical_name(
    sqlite_url: str, broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = write_gguf(tmp_path / "only.gguf", context=64)
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "max_new_tokens": 65}])
    monkeypatch.chdir(tmp_path)
    code, output = _submit(sqlite_url, broker_url, path, "--model", "./")
    assert code == 1 and "must be <= 64 (the model's context)" in output
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "max_new_tokens": 64}])
    assert _submit(sqlite_url, broker_url, path, "--model", "./")[0] == 0
    with create_engine(sqlite_url).connect() as c:
        assert c.execute(text("SELECT model FROM jobs")).scalars().all() == [str(file)]
    assert redis.Redis.from_url(broker_url).llen(resolve(str(file)).queue) == 1


@pytest.mark.slow
def test_a_worker_holding_a_gguf_file_takes_a_job_for_its_directory(pg_url: str, broker_url: str, tmp_path: Path) -> None:
    """The worker is given the file (through a symlink), the producer the directory, relative: one queue, one model."""
    from tests.helpers import WorkerProcess, env_for, producer, wait_for_job

    models = tmp_path / "models"
    models.mkdir()
    (models / "smol.gguf").symlink_to(smollm2_dir() / SMOLLM2_GGUF)
    env = env_for(pg_url, broker_url)
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "The capital of France is", "temperature": 0, "max_new_tokens": 4}])
    worker = WorkerProcess(env, model=str(models / "smol.gguf"))
    try:
        job_id = int(producer(["submit", str(prompts), "--model", str(models)], env, check=True).stdout.split()[-1])
        assert wait_for_job(pg_url, job_id, timeout=400) == "completed", worker.output()[-3000:]
    finally:
        worker.stop()
    with create_engine(pg_url).connect() as c:
        assert c.execute(text("SELECT model FROM jobs WHERE id = :j"), {"j": job_id}).scalar_one() == str(smollm2_dir() / SMOLLM2_GGUF)
        assert c.execute(text("SELECT completion_tokens FROM results WHERE job_id = :j"), {"j": job_id}).scalar_one() == 4
