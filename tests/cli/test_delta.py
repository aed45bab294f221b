"""CLIs: examples/residual.py and `python -m lora.delta`; bad input -> one stderr line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.delta import main
from tests.lora.test_delta import family, load_sd, write_model
from tests.helpers import hf_model

ROOT = Path(__file__).resolve().parents[2]


def _closed_form_ok(out: Path, paths: dict, scale: float) -> None:
    got, b, c, t = load_sd(out), load_sd(paths["base"]), load_sd(paths["chat"]), load_sd(paths["target"])
    for k in t:
        ref = (t[k].double() + scale * (c[k].double() - b[k].double())).float()
        torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-7)


def test_examples_residual_script(tmp_path):
    paths, _ = family(tmp_path)
    cmd = [sys.executable, str(ROOT / "examples" / "residual.py"), "--base", str(paths["base"]),
           "--chat", str(paths["chat"]), "--target", str(paths["target"]), "--out", str(tmp_path / "out"),
           "--scale", "0.5"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "eos <|im_end|>" in done.stdout
    _closed_form_ok(tmp_path / "out", paths, 0.5)
    bad = subprocess.run(cmd[:2] + ["--base", str(tmp_path / "missing")] + cmd[4:], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"residual.py: error: --base {tmp_path / 'missing'}: not a directory"]


def _run(argv, capsys):
    capsys.readouterr()  # drop what building the fixtures printed
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_module_cli_commands(tmp_path, capsys):
    paths, _ = family(tmp_path)
    p = {k: str(v) for k, v in paths.items()}
    code, out, _ = _run(["residual", "--base", p["base"], "--chat", p["chat"], "--target", p["target"],
                         "--out", str(tmp_path / "r"), "--scale", "0.25", "--mlp-scale", "2", "--no-hash"], capsys)
    assert code == 0 and "group scales {'mlp': 2.0}" in out
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["effective_scales"]["mlp"] == 0.5 and "sha256" not in m["inputs"]["base"]
    assert _run(["diff", p["chat"], p["base"], "--out", str(tmp_path / "d")], capsys)[0] == 0
    assert _run(["apply", p["target"], str(tmp_path / "d"), "--out", str(tmp_path / "a"), "--scale", "0.5"], capsys)[0] == 0
    _closed_form_ok(tmp_path / "a", paths, 0.5)
    code, out, _ = _run(["arith", "--delta", str(tmp_path / "d"), "-1.5", "--base", p["base"],
                         "--out", str(tmp_path / "t")], capsys)
    assert code == 0 and "-1.5" in out
    code, out, _ = _run(["extract", str(tmp_path / "d"), "-r", "4", "--out", str(tmp_path / "lora")], capsys)
    assert code == 0 and "retained energy per layer" in out
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 4
    code, out, _ = _run(["report", p["chat"], p["base"], "--json", str(tmp_path / "rep.json")], capsys)
    assert code == 0 and "relative change" in out and (tmp_path / "rep.json").exists()


@pytest.mark.parametrize("case", ["no_command", "missing_dir", "no_config", "bad_scale", "unknown_flag",
                                  "vocab", "exists", "not_delta", "bad_weight"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    paths, _ = family(tmp_path)
    p = {k: str(v) for k, v in paths.items()}
    res = ["residual", "--base", p["base"], "--chat", p["chat"], "--target", p["target"], "--out", str(tmp_path / "o")]
    (tmp_path / "empty").mkdir()
    argv, expect = {
        "no_command": ([], "a command is required"),
        "missing_dir": (res[:2] + [str(tmp_path / "nope")] + res[3:], "--base"),
        "no_config": (res[:2] + [str(tmp_path / "empty")] + res[3:], "no config.json"),
        "bad_scale": (res + ["--scale", "nan"], "--scale"),
        "unknown_flag": (res + ["--frobnicate"], "--frobnicate"),
        "vocab": (res[:6] + [str(write_model(hf_model("qwen2", vocab_size=336), tmp_path / "w"))] + res[7:],
                  "vocabulary rows differ"),
        "exists": (res[:-1] + [p["chat"]], "holds the input"),
        "not_delta": (["apply", p["target"], p["chat"], "--out", str(tmp_path / "o")], "not a delta checkpoint"),
        "bad_weight": (["arith", "--delta", p["chat"], "x", "--out", str(tmp_path / "o")], "--delta"),
    }[case]
    code, _, err = _run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen-tune delta") and expect in lines[0], err
    assert not (tmp_path / "o").exists()


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "lora.delta"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "python -m lora.delta: error: a command is required: residual, diff, apply, arith, extract or report"]
