"""What a new user meets first: the demo model by name everywhere, commands whose defaults
fit the model, one meaning per flag, messages that say what to change, the checkpoint's
own sampling defaults, and a busy port reported as one line."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import vlmc

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "vlmc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def one_error(res, *needles):
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("vlmc: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_the_demo_model_has_a_name_everywhere(tmp_path):
    shown = cli("inspect", "vlmc-demo")
    assert shown.returncode == 0, shown.stderr
    assert "block[4x text.layers.{i}.]" in shown.stdout
    out = cli("compile", "vlmc-demo", "-o", tmp_path / "q4", "-q", "q4")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "q4" / "manifest.json").read_text())["meta"]["quantization"]["scheme"] == "q4"
    assert vlmc.load("vlmc-demo").generate("What color is the circle?", images=[str(EXAMPLES / "shapes-1.png")],
                                           max_tokens=4).text == "green"
    missing = cli("inspect", "no-such-model")
    one_error(missing, "no such checkpoint folder", "vlmc-demo for the bundled demo model")


def test_bench_defaults_fit_the_model_and_errors_name_the_flag():
    res = cli("bench", "vlmc-demo", "--decode-tokens", "4", "--image-size", "56", "--json", "-")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["config"]["prompt_lengths"] == [128, 512]  # 2048 does not fit the 1024-token context
    assert "prompt lengths 128,512 instead of 128,512,2048" in res.stderr
    line = one_error(cli("bench", "vlmc-demo", "--prompt-lengths", "2000"), "lower --prompt-lengths")
    assert "2001 tokens; the model's context is 1024" in line
    one_error(cli("bench", "vlmc-demo", "--context", "1024"), "1024-token context and 33 decode steps need 1057",
              "lower --context or --decode-tokens")


def test_one_meaning_per_flag(tmp_path):
    assert cli("bench", "vlmc-demo", "-q").returncode == 2        # -q is --quantize; bench has --quiet
    shown = cli("inspect", "vlmc-demo", "--json", "-")
    assert shown.returncode == 0 and json.loads(shown.stdout)["functions"]["decode"]["name"] == "decode"
    from vlmc.demo import MODEL_DIR
    art = vlmc.compile(MODEL_DIR, tmp_path / "art")
    cli("inspect", art, "--json", tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["format"] == "vlmc-artifact"
    one_error(cli("compile", "vlmc-demo", "-o", tmp_path / "x", "--kv-bits", "5"), "2, 3, 4 or 8 bits, got 5")
    assert "fractional" not in cli("compile", "vlmc-demo", "-o", tmp_path / "x", "--kv-bits", "5").stderr


def test_verbose_run_shows_only_measured_rates_and_small_memory_in_mb():
    from vlmc.cli import run_summary
    line = run_summary({"prompt_tokens": 12, "prompt_tps": 300.0, "generation_tokens": 1, "generation_tps": 0.0,
                        "peak_memory_gb": 0.0123}, "stop")
    assert line == "prompt: 12 tokens, 300.0 tok/s | generation: 1 token | peak memory 12.3 MB | finish: stop"
    res = cli("run", "vlmc-demo", "-p", "What color is the circle?", "-i", EXAMPLES / "shapes-1.png", "-v")
    assert res.returncode == 0 and res.stdout.strip() == "green", res.stderr
    assert "sampling: greedy" in res.stderr and "0.0 tok/s" not in res.stderr


def test_a_busy_port_is_one_error_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = cli("serve", "--port", port, timeout=120)
    line = one_error(res, f"cannot listen on 127.0.0.1:{port}", "pick another --port")
    assert "listening" not in res.stderr


def test_tests_use_a_temporary_cache():
    from vlmc.compiler import cache_dir
    assert cache_dir() != Path.home() / ".cache" / "vlmc"


# ---------------------------------------------------------------- the checkpoint's sampling defaults

torch = pytest.importorskip("torch")


def test_temperature_zero_keeps_the_checkpoints_repetition_penalty(tmp_path):
    """As transformers' generate(do_sample=False) does: greedy, with the repetition penalty
    generation_config.json sets; --generation-config vlmc leaves the penalty out."""
    from fixtures import checkpoints as ck
    info = ck.build_checkpoint(tmp_path / "ck", "qwen2_vl", generation={"repetition_penalty": 3.0})
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me a short story about the river."}]}]
    ref = ck.hf_reference(info["path"], "qwen2_vl", messages, [])
    model = ck.hf_model(info["path"], "qwen2_vl")
    model.generation_config.repetition_penalty = 1.0
    plain = ck.hf_reference(info["path"], "qwen2_vl", messages, [], model=model)
    assert list(ref["greedy_tokens"]) != list(plain["greedy_tokens"])  # the penalty matters here
    m = vlmc.load(vlmc.compile(info["path"], tmp_path / "art"))
    assert m.sampling_params(temperature=0).repetition_penalty == 3.0
    got = m.generate(messages=messages, max_tokens=16, temperature=0)
    eos = set(info["eos_token_ids"])
    expected = list(ref["greedy_tokens"])
    expected = expected[:next((i for i, t in enumerate(expected) if t in eos), len(expected))]
    assert got.token_ids == expected
    ours = vlmc.load(m.artifact.path, generation_config="vlmc")
    assert ours.sampling_params(temperature=0).repetition_penalty == 1.0
    shown = cli("inspect", m.artifact.path)
    assert "sampling defaults (generation_config.json): greedy, repetition_penalty 3" in shown.stdout
