"""examples/export.py: a merged model -> GGUF + Modelfile; bad input is one line and exit 2,
and nothing already written is replaced without --overwrite. (The file's contents are tested
against references in tests/models/test_gguf.py.)"""

from __future__ import annotations
import shutil

import pytest

from tests.examples.conftest import assert_usage_error, run_script, tree_digest

gguf = pytest.importorskip("gguf")

from tests.models.test_gguf import SMALL, write_model  # noqa: E402

from cli.errors import UsageError  # noqa: E402
from examples import export as export_script  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path, _ = write_model(tmp_path_factory.mktemp("export") / "merged", "qwen2", tie_word_embeddings=True, **SMALL)
    return path


def test_writes_gguf_and_modelfile_then_refuses_to_overwrite(tmp_path, model_dir):
    out = tmp_path / "gguf" / "chat-q8_0.gguf"
    proc = run_script("export.py", "--model", model_dir, "--gguf", out, "--type", "q8_0", "--name", "Chat")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["general.name"] == "Chat"
    assert (out.parent / "Modelfile").read_text(encoding="utf-8").splitlines()[1] == "FROM ./chat-q8_0.gguf"
    assert f"ollama create chat -f {out.parent / 'Modelfile'}" in proc.stdout
    assert f"llama-cli -m {out}" in proc.stdout

    before = tree_digest(out.parent)
    proc = run_script("export.py", "--model", model_dir, "--gguf", out)
    assert_usage_error(proc, "--gguf", str(out), "already exists", "--overwrite")
    assert tree_digest(out.parent) == before


def _usage_error(argv) -> str:
    with pytest.raises(UsageError) as e:
        export_script.main(argv)
    return str(e.value)


def test_bad_input(tmp_path, model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --model (runs/sft/merged) does not exist here
    assert "neither runs/dpo/merged nor runs/sft/merged exists" in _usage_error([])
    assert "not a Qwen checkpoint (no config.json)" in _usage_error(["--model", str(tmp_path)])
    assert "ending in .gguf" in _usage_error(["--model", str(model_dir), "--gguf", "model.bin"])

    # Another model's Modelfile in the folder is protected (its owner is named), unless --overwrite.
    out = tmp_path / "a" / "m.gguf"
    assert export_script.main(["--model", str(model_dir), "--gguf", str(out), "--type", "bf16"]) == 0
    other_model, _ = write_model(tmp_path / "other-model", "qwen2", seed=1, tie_word_embeddings=True, **SMALL)
    other = tmp_path / "a" / "other.gguf"
    error = _usage_error(["--model", str(other_model), "--gguf", str(other)])
    assert "Modelfile beside it belongs to another model" in error and str(model_dir.resolve()) in error
    assert not other.exists()
    assert export_script.main(["--model", str(other_model), "--gguf", str(other), "--overwrite"]) == 0
    assert (tmp_path / "a" / "Modelfile").read_text(encoding="utf-8").splitlines()[:2] == [
        f"# qwen-tune export of {other_model.resolve()}", "FROM ./other.gguf"]
    # A Modelfile we did not write (no owner line) is protected too.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "Modelfile").write_text("FROM llama3\n", encoding="utf-8")
    assert "a Modelfile qwen-tune did not write" in _usage_error(["--model", str(model_dir), "--gguf",
                                                                 str(tmp_path / "b" / "m.gguf")])


def _pipeline_runs(work, model_dir, stages=("sft",)):
    """runs/<stage>/merged under `work`, as sft.py / dpo.py leave them (copies of one small model)."""
    for stage in stages:
        shutil.copytree(model_dir, work / "runs" / stage / "merged")


def test_the_readme_second_export_of_the_default_model(tmp_path, model_dir):
    """Issue 30, item 7: after the default run, the README's q8_0 export into the same folder is the
    same model's: accepted, and the Modelfile now points at the new file."""
    _pipeline_runs(tmp_path, model_dir)
    proc = run_script("export.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "gguf" / "model-f16.gguf").is_file()
    proc = run_script("export.py", "--gguf", "runs/gguf/chat-q8_0.gguf", "--type", "q8_0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "runs/gguf/chat-q8_0.gguf").fields.items()}
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    lines = (tmp_path / "runs" / "gguf" / "Modelfile").read_text(encoding="utf-8").splitlines()
    assert lines[:2] == [f"# qwen-tune export of {(tmp_path / 'runs/sft/merged').resolve()}", "FROM ./chat-q8_0.gguf"]


def test_no_model_takes_the_latest_stage(tmp_path, model_dir):
    """Issue 30, item 6: with runs/dpo/merged present, the default is DPO's model, and it says so."""
    _pipeline_runs(tmp_path, model_dir, ("sft", "dpo"))
    proc = run_script("export.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the latest stage's merged model, dpo (runs/dpo/merged)" in proc.stdout
    first = (tmp_path / "runs" / "gguf" / "Modelfile").read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# qwen-tune export of {(tmp_path / 'runs/dpo/merged').resolve()}"


def test_a_qwen3_moe_folder_is_exported(tmp_path):
    """Issue 30, item 9: export.py turned a qwen3_moe folder down; it is llama.cpp's qwen3moe now
    (the tensors themselves: tests/models/test_gguf.py::test_qwen3_moe_as_llama_cpp_converts_it)."""
    from tests.models.test_gguf import SMALL_MOE

    model, _ = write_model(tmp_path / "moe", "qwen3_moe", tie_word_embeddings=False, **SMALL_MOE)
    proc = run_script("export.py", "--model", model, "--gguf", tmp_path / "moe.gguf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "moe.gguf").fields.items()}
    assert fields["general.architecture"] == "qwen3moe" and fields["qwen3moe.expert_count"] == SMALL_MOE["num_experts"]
    assert "qwen3moe" in proc.stdout
