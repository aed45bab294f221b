"""examples/export.py: a merged model -> GGUF + Modelfile; bad input is one line and exit 2,
and nothing already written is replaced without --overwrite. (The file's contents are tested
against references in tests/models/test_gguf.py.)"""

from __future__ import annotations


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
    assert (out.parent / "Modelfile").read_text(encoding="utf-8").startswith("FROM ./chat-q8_0.gguf\n")
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
    assert "runs/sft/merged does not exist" in _usage_error([])
    assert "not a Qwen checkpoint (no config.json)" in _usage_error(["--model", str(tmp_path)])
    assert "ending in .gguf" in _usage_error(["--model", str(model_dir), "--gguf", "model.bin"])

    out = tmp_path / "a" / "m.gguf"
    assert export_script.main(["--model", str(model_dir), "--gguf", str(out), "--type", "bf16"]) == 0
    other = tmp_path / "a" / "other.gguf"  # same folder: the Modelfile there points at m.gguf
    error = _usage_error(["--model", str(model_dir), "--gguf", str(other)])
    assert "Modelfile beside it belongs to another model" in error
    assert not other.exists()
    assert export_script.main(["--model", str(model_dir), "--gguf", str(other), "--overwrite"]) == 0
    assert (tmp_path / "a" / "Modelfile").read_text(encoding="utf-8").startswith("FROM ./other.gguf\n")
