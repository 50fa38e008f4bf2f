"""The structure the families, the runtime and the passes share: the family registry and
interface, a runtime that names no family, one step loop (decode / verify / trim), typed
KV caches that the lowering reads, re-plans that recompile, param roles and real dtypes."""
from __future__ import annotations

import ast
import re
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import vlmc
from fixtures.checkpoints import build_checkpoint
from vlmc.errors import UnsupportedModelError, VlmcError
from vlmc.ir.ops import fast_path_reads
from vlmc.ir.verify import VerifyError, verify
from vlmc.options import CompileOptions, KVOptions

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def demo_artifact(tmp_path_factory):
    from vlmc.demo import MODEL_DIR
    return vlmc.compile(MODEL_DIR, tmp_path_factory.mktemp("arch") / "demo")


@pytest.fixture(scope="module")
def demo(demo_artifact):
    return vlmc.load(demo_artifact)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "qwen2_vl"
    build_checkpoint(path, "qwen2_vl")
    return path


# ---------------------------------------------------------------- families

def test_every_family_folder_registers_its_model_types():
    from vlmc.models import families, family, supported_model_types
    assert {"llava", "qwen2_5_vl", "qwen2_vl"} <= set(supported_model_types())
    assert {f.name for f in families().values()} == {p.name for p in (ROOT / "vlmc" / "models").iterdir()
                                                     if (p / "__init__.py").is_file() and p.name != "common"}
    assert family("qwen2_5_vl") is family("qwen2_vl")
    listed = re.escape("'gpt2' is not supported; supported: " + ", ".join(supported_model_types()))
    with pytest.raises(UnsupportedModelError, match=listed):
        family("gpt2")


FAMILY_WORDS = ("qwen", "llava", "mrope", "siglip", "gemma")


def _code_words(path: Path) -> list[tuple[int, str]]:
    """Identifiers and string literals of a Python file, docstrings and comments left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            out.append((node.lineno, node.name))
        elif isinstance(node, ast.arg):
            out.append((node.lineno, node.arg))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out += [(node.lineno, a.name) for a in node.names] + [(node.lineno, getattr(node, "module", "") or "")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
    return out


def test_runtime_serve_compiler_and_bench_name_no_family():
    """They reach families only through the interface: no family name, M-RoPE or tower
    name in their code (comments and docstrings may mention them)."""
    files = [*(ROOT / "vlmc" / "runtime").glob("*.py"), *(ROOT / "vlmc" / "serve").glob("*.py"),
             ROOT / "vlmc" / "compiler.py", ROOT / "vlmc" / "bench.py"]
    found = [f"{f.relative_to(ROOT)}:{line}: {word!r}" for f in files for line, word in _code_words(f)
             if any(w in word.lower() for w in FAMILY_WORDS)]
    assert found == []


def test_the_runtime_loads_no_compiler_module(demo_artifact):
    """Generating from an artifact imports no frontend, passes, IR builder, backend or
    transformers/torch: the family's runtime half comes without its importer."""
    code = ("import sys, vlmc\n"
            f"m = vlmc.load({str(demo_artifact)!r})\n"
            f"m.generate('What color is the circle?', images=[{str(EXAMPLES / 'shapes-1.png')!r}], max_tokens=3)\n"
            "bad = ('vlmc.frontend', 'vlmc.passes', 'vlmc.ir.builder', 'vlmc.backends', 'vlmc.compiler',\n"
            "       'vlmc.models.qwen2_vl.importer', 'vlmc.models.llava.importer', 'transformers', 'torch')\n"
            "print(sorted(k for k in sys.modules if k.startswith(bad)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------- one step loop

def _prompt(m):
    return m.build_prompt("Describe the image.", images=[str(EXAMPLES / "shapes-2.png")])


def _greedy_decode(m, p, n):
    from vlmc.runtime.step import Sequences
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(p)])
    logits = [seqs.prefill()]
    for _ in range(n):
        tok = mx.argmax(logits[-1], axis=-1)
        logits.append(seqs.decode(tok))
    return [np.array(x[0].astype(mx.float32)) for x in logits]


@pytest.mark.parametrize("kv", [{}, {"kv_bits": 4}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}],
                         ids=["dense", "kv4", "turbo3.5"])
def test_verify_equals_decode_steps_and_trim_rewinds(demo_artifact, kv):
    """verify runs several tokens in one step: its logits are the decode steps' ones; trim
    forgets tokens so that decoding again gives the same logits as before."""
    from vlmc.runtime.step import Sequences
    m = vlmc.load(demo_artifact, **kv)
    p = _prompt(m)
    steps = _greedy_decode(m, p, 4)
    tokens = [int(np.argmax(x)) for x in steps[:4]]
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(p)])
    seqs.prefill()
    first = int(seqs.next_pos[0])
    out = np.array(seqs.verify(mx.array([tokens])).astype(mx.float32))[0]
    for i in range(4):
        np.testing.assert_allclose(out[i], steps[i + 1], atol=2e-4 * np.abs(steps[i + 1]).max())
    seqs.trim(2)
    assert seqs.offset == len(p.ids) + 2 and int(seqs.next_pos[0]) == first + 2
    again = np.array(seqs.decode(mx.array([tokens[2]])).astype(mx.float32))[0]
    np.testing.assert_allclose(again, steps[3], atol=2e-4 * np.abs(steps[3]).max())
    with pytest.raises(ValueError, match="cannot rewind"):
        seqs.trim(10_000)


def test_batching_loop_and_generate_compute_the_same_logprobs(demo):
    """The batching loop steps through the same Sequences as generate: each token's
    log-probability agrees (it placed every generated token one position too far before)."""
    import threading
    from vlmc.runtime.batcher import Batcher, FinishEvent, Job, TokenEvent
    from vlmc.runtime.sampling import Sampler, SamplingParams
    p = _prompt(demo)
    engine = []
    for tok, logits in demo.generate_steps([p], Sampler(SamplingParams()), 8):
        lp = logits[0].astype(mx.float32) - mx.logsumexp(logits[0].astype(mx.float32))
        engine.append(float(lp[int(tok[0].item())].item()))
    got, done = [], threading.Event()

    def emit(ev):
        if isinstance(ev, TokenEvent):
            got.append(ev.logprob)
        elif isinstance(ev, FinishEvent):
            done.set()
    b = Batcher(demo)
    try:
        b.submit(Job(p, emit, SamplingParams(), 8, logprobs=0))
        assert done.wait(120)
    finally:
        b.shutdown()
    n = len(got)
    assert n >= 2
    np.testing.assert_allclose(got, engine[:n], atol=2e-3)


# ---------------------------------------------------------------- typed KV caches, re-plans

def _layers(art: Path) -> list[dict]:
    return next(iter(json.loads((art / "manifest.json").read_text())["kv_plan"].values()))


@pytest.mark.parametrize("kv", [{"kv_bits": 8}, {"kv_bits": 4}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"},
                                {"max_kv_size": 48}], ids=["kv8", "kv4", "turbo3.5", "window48"])
def test_a_replan_recompiles_and_picks_fast_paths_for_its_layouts(demo_artifact, kv):
    """Loading an artifact with other KV options recompiles its plan and lowering (cached,
    weights shared): the generated code has the decode_layer fast path exactly when every
    planned cache is one that path reads."""
    m = vlmc.load(demo_artifact, **kv)
    art = m.artifact.path
    assert art != demo_artifact and art.name.startswith("replan-")
    layers = _layers(art)
    assert m.kv_layers == layers and layers[0]["kv"]["layout"] != "dense"
    fast = all(fast_path_reads("decode_layer", L["kv"]) for L in layers)
    assert ("ops.decode_layers(" in (art / "model.py").read_text()) == fast
    lower = [h for h in m.artifact.manifest["passes"] if h["name"] == "lower"][0]["summary"]
    assert ("decode_layer fast path for" in lower) == fast
    base = json.loads((demo_artifact / "manifest.json").read_text())
    for f in {t["file"] for t in base["tensors"].values()}:
        assert os.path.samefile(demo_artifact / f, art / f) or (art / f).read_bytes() == (demo_artifact / f).read_bytes()
    assert vlmc.load(demo_artifact, **kv).artifact.path == art     # the second load reuses it
    assert "ops.decode_layers(" in (demo_artifact / "model.py").read_text()  # the dense build has it


def test_the_ir_declares_the_kv_layouts_the_fast_path_kernel_reads():
    from vlmc.ir.ops import FAST_PATH_KV
    from vlmc.kernels.cpu.decode_layer import SUPPORTED_KV, supports_kv
    assert FAST_PATH_KV["decode_layer"] == SUPPORTED_KV
    for spec in ({"layout": "dense"}, {"layout": "quantized", "bits": 4, "group_size": 64},
                 {"layout": "quantized", "bits": 3, "group_size": 64}, {"layout": "rotating", "window": 8},
                 {"layout": "turboquant", "k_bits": 3, "v_bits": 4}):
        assert fast_path_reads("decode_layer", spec) == supports_kv(spec), spec


def test_the_verifier_checks_every_layer_has_a_kv_cache_type(qwen):
    from vlmc.frontend import open_checkpoint
    from vlmc.models import import_checkpoint
    prog = import_checkpoint(open_checkpoint(qwen))
    verify(prog)
    bad = prog.clone()
    bad.blocks["text_layer"].layers[1]["kv"] = {"layout": "quantized", "group_size": 64}
    with pytest.raises(VerifyError, match="layer 1: quantized KV cache lacks a positive bits"):
        verify(bad)
    bad.blocks["text_layer"].layers[1]["kv"] = "dense"
    with pytest.raises(VerifyError, match="is not a KV cache type"):
        verify(bad)


# ---------------------------------------------------------------- roles and dtypes

def test_params_carry_roles_and_the_manifest_records_them(tmp_path):
    from vlmc.demo import MODEL_DIR
    art = vlmc.compile(MODEL_DIR, tmp_path / "art", quantize="q4", recipe="mixed")
    tensors = json.loads((art / "manifest.json").read_text())["tensors"]
    assert all(t["role"] and t["part"] in ("text", "vision", "projector") for t in tensors.values())
    assert tensors["text.layers.1.self_attn.q_proj+k_proj+v_proj.weight"]["role"] == "q+k+v"
    assert tensors["text.layers.1.mlp.gate_proj+up_proj.weight"]["role"] == "gate+up"
    assert tensors["text.embed_tokens.weight"]["role"] == "embed"
    quantized = json.loads((art / "manifest.json").read_text())["quantized"]
    # the mixed recipe found the sensitive weights by role and layer: v (inside q+k+v), down,
    # and everything in the first and last layers at 6 bits
    last = json.loads((art / "manifest.json").read_text())["meta"]["text"]["num_layers"] - 1
    bits = {(int(n.split(".")[2]), n.split(".", 3)[3]): q["bits"] for n, q in quantized.items()
            if n.startswith("text.layers.")}
    for (layer, name), b in bits.items():
        sensitive = layer in (0, last) or name.startswith(("self_attn.q_proj+k_proj+v_proj", "mlp.down_proj"))
        assert b == (6 if sensitive else 4), (layer, name)
    assert any(b == 4 for b in bits.values())


@pytest.mark.parametrize("target,values,cast", [("metal", "bfloat16", False), ("cpu", "float32", True)])
def test_values_carry_the_dtypes_the_code_computes(qwen, tmp_path, target, values, cast):
    art = vlmc.compile(qwen, tmp_path / target, dtype="bfloat16", target=target)
    ir = (art / "program.ir").read_text()
    body = ir[ir.index("text_layer("):ir.index("return", ir.index("text_layer("))]
    assert f"%x: {values}[B,L," in body and "= rms_norm(%x, @input_layernorm.weight)" in body
    assert f"%norm1: {values}[B,L," in body
    decode = ir[ir.index("entry decode("):]
    assert ("bfloat16[B,1," in decode and "cast(" in decode) == cast


# ---------------------------------------------------------------- typed options

def test_options_are_validated_where_they_are_defined():
    with pytest.raises(VlmcError, match="--quantize must be one of"):
        CompileOptions(quantize="q7")
    with pytest.raises(VlmcError, match="--kv-bits|2, 3, 4 or 8 bits, got 5$"):
        KVOptions(kv_bits=5)
    with pytest.raises(TypeError, match="unknown option"):
        vlmc.load("anything", context=5)
    assert KVOptions(kv_bits=4).changed() == {"kv_bits": 4}
    assert CompileOptions(no_fuse=["qkv", "qkv"]).no_fuse == ("qkv",)
    assert set(CompileOptions().pass_options()) == {"fuse", "storage_dtype", "pad_hidden", "quantize", "kv_layout", "lower"}


# ---------------------------------------------------------------- bidirectional spans

def test_bidirectional_spans_reach_the_mask_and_chunks_never_cut_them(demo, monkeypatch):
    """A family's attention spans (image tokens attending to each other both ways, as Gemma 3
    and PaliGemma need): the prompt's logits change, and a chunked prefill (chunks extended
    to a span's end) and a left-padded batch give the one-shot prefill's logits."""
    from vlmc.runtime.step import Sequences
    p = _prompt(demo)
    tok = demo.image_token_id
    first = p.ids.index(tok)
    last = len(p.ids) - p.ids[::-1].index(tok)
    causal = Sequences.start(demo.decoder, [demo.prompt_inputs(p)])
    causal_logits = np.array(causal.prefill())
    monkeypatch.setattr(demo.inputs, "attention_spans", lambda ids, images: [(first, last)])
    inputs = demo.prompt_inputs(p)
    assert inputs.spans == [(first, last)]
    whole = np.array(Sequences.start(demo.decoder, [inputs]).prefill())
    assert np.abs(whole - causal_logits).max() > 1e-3
    chunked = Sequences.start(demo.decoder, [inputs])
    widths = []
    while not chunked.prefill_done:
        before = chunked.prefilled
        logits = chunked.prefill(first + 3)  # the first chunk would end inside the span: it is extended
        widths.append(chunked.prefilled - before)
    assert widths[0] == last and len(widths) >= 2
    np.testing.assert_allclose(np.array(logits), whole, atol=2e-4)
    # a chunk that is exactly the span, onto a non-empty cache: few enough tokens for the cpu
    # target's one-call layer path, which must decline (it attends causally) and run the ops
    assert last - first <= 16
    exact = Sequences.start(demo.decoder, [inputs])
    exact.prefill(first)
    exact.prefill(last - first)
    np.testing.assert_allclose(np.array(exact.prefill()), whole, atol=2e-4)
    short = demo.build_prompt("Hi")
    batch = Sequences.start(demo.decoder, [demo.prompt_inputs(short), inputs])  # the short prompt is left-padded
    batched = np.array(batch.prefill())
    np.testing.assert_allclose(batched[1], whole[0], atol=2e-4)
    assert batch.safe_prefix(1, first + 5) == first and batch.safe_prefix(1, last) == last
