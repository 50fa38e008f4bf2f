"""The pure helpers behind benchmarks/compare.py's llama.cpp peer: parsing what llama.cpp's
tools print, the batched-run arithmetic, the order of rounds and merging them, and tables
from the JSON files earlier runs wrote. No llama.cpp is needed: the
inputs under fixtures/llamacpp/ are the tools' own output, captured from the build
``benchmarks/llamacpp.py build`` makes (llama-cpp-python 0.3.36's vendored llama.cpp) on a
Qwen2-VL-2B-shaped checkpoint: ``llama-bench -o json`` (-p 128; -n 32 -d 128),
``llama-batched-bench --output-format jsonl`` (-npp 128 -ntg 32 -npl 1,8) and
``llama-mtmd-cli`` with ``mtmd_args`` on a 448x448 image."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
CAPTURED = Path(__file__).resolve().parent / "fixtures" / "llamacpp"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


lc = _load("llamacpp")
compare = _load("compare")


def _captured(name: str) -> str:
    return (CAPTURED / name).read_text()


def test_llama_bench_json_gives_per_repetition_speeds():
    (pp,) = lc.parse_llama_bench(_captured("llama-bench-pp128.json"))
    assert (pp["n_prompt"], pp["n_gen"], pp["n_depth"]) == (128, 0, 0)
    assert pp["samples_ts"] == [13.475] and pp["avg_ts"] == pytest.approx(13.474969)
    assert pp["n_threads"] == 2 and pp["model_type"] == "qwen2vl ?B Q4_K - Medium"
    (tg,) = lc.parse_llama_bench(_captured("llama-bench-tg32-d128.json"))
    assert (tg["n_prompt"], tg["n_gen"], tg["n_depth"]) == (0, 32, 128)
    assert tg["samples_ts"] == [0.471076]


def test_llama_bench_json_after_other_output_and_errors():
    # with stderr merged in front; two tests in one run (-p and -n given together)
    rows = json.loads(_captured("llama-bench-pp128.json")) + json.loads(_captured("llama-bench-tg32-d128.json"))
    text = "load_backend: loaded CPU backend\n" + json.dumps(rows, indent=2) + "\n"
    assert [(r["n_prompt"], r["n_gen"]) for r in lc.parse_llama_bench(text)] == [(128, 0), (0, 32)]
    with pytest.raises(ValueError):
        lc.parse_llama_bench("error: failed to load model\n")


def test_batched_bench_jsonl_rows():
    rows = lc.parse_batched_bench(_captured("batched-bench-pp128-tg32.jsonl"))
    assert [(r["pp"], r["tg"], r["pl"]) for r in rows] == [(128, 32, 1), (128, 32, 8)]
    eight = rows[1]
    # its own arithmetic: S_PP = pl * pp / T_PP, S_TG = pl * tg / T_TG, S = pl * (pp + tg) / T
    assert eight["speed_pp"] == pytest.approx(8 * 128 / eight["t_pp"], rel=1e-5)
    assert eight["speed_tg"] == pytest.approx(8 * 32 / eight["t_tg"], rel=1e-5)
    assert eight["speed"] == pytest.approx(8 * (128 + 32) / eight["t"], rel=1e-5)
    # log lines (JSON too, with --log-jsonl) and the markdown table are not rows
    log = '{"type":"log","time":11035342,"level":"info","msg":"cmn          init: llama threadpool init"}'
    assert lc.parse_batched_bench(log + "\n|    PP |     TG |\n" + _captured("batched-bench-pp128-tg32.jsonl")) == rows


def test_mtmd_log_gives_ttft_vision_and_prompt_length():
    text = _captured("mtmd-cli-448.jsonl")
    r = lc.parse_mtmd(text)
    recs = [json.loads(x) for x in text.splitlines() if x.startswith('{"type":"log"')]
    start = next(x["time"] for x in recs if "For normal use cases" in x["msg"])
    enc = next(x["time"] for x in recs if x["msg"].startswith("encoding mtmd batch"))
    done = next(x["time"] for x in recs if x["msg"].startswith("mtmd batch encoding done"))
    # after the encoding: the message's closing "\n", then the first piece (level "none")
    after = [x for x in recs if x["time"] > done and x["level"] == "none"]
    assert after[0]["msg"] == "\n"
    assert r["ttft_ms"] == pytest.approx((after[1]["time"] - start) / 1e3)
    assert r["vision_ms"] == pytest.approx((done - enc) / 1e3)
    assert "74378 ms" in next(x["msg"] for x in recs if x["time"] == done)   # what the tool itself says
    assert r["prompt_tokens"] == 279 and r["image_tokens"] == 256        # 256 image + 23 text tokens


def test_mtmd_first_token_that_ends_generation_still_counts():
    # an end-of-generation token prints "\n" where a piece would be: that is the first token
    lines = _captured("mtmd-cli-448.jsonl").splitlines()
    first = next(i for i, x in enumerate(lines) if '"msg":""' in x and '"level":"none"' in x)
    eog = lines[first].replace('"msg":""', '"msg":"\\n"')
    r = lc.parse_mtmd("\n".join(lines[:first] + [eog] + lines[first + 1:]))
    assert r["ttft_ms"] == pytest.approx(lc.parse_mtmd("\n".join(lines))["ttft_ms"])


def test_mtmd_log_without_a_first_token_is_refused():
    lines = _captured("mtmd-cli-448.jsonl").splitlines()
    cut = next(i for i, x in enumerate(lines) if "mtmd batch encoding done" in x)
    with pytest.raises(ValueError):
        lc.parse_mtmd("\n".join(lines[:cut + 1]))          # killed during the prefill
    with pytest.raises(ValueError):
        lc.parse_mtmd("\n".join(x for x in lines if "For normal use cases" not in x))


def test_mtmd_args_single_turn_with_timestamps():
    a = lc.mtmd_args("/x.png", "Describe this image.")
    assert a[a.index("--image") + 1] == "/x.png" and a[a.index("-n") + 1] == "1"
    assert a[a.index("-p") + 1] == "Describe this image."
    assert "--log-jsonl" in a and "--log-timestamps" in a and a[a.index("-lv") + 1] == "4"


def test_qwen2_pretokenizer_is_recognized_from_tokenizer_json(tmp_path):
    # the benchmark checkpoints' tokenizer (make_checkpoint.py) splits with Qwen2's regex
    from fixtures.checkpoints import build_tokenizer
    build_tokenizer(tmp_path, "qwen2_vl")
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    assert lc.split_regex(tj) == lc.QWEN2_PRETOKENIZER
    assert lc.split_regex({"pre_tokenizer": {"type": "ByteLevel"}}) is None
    other = {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"\s+"}}}
    assert lc.split_regex(other) == r"\s+" != lc.QWEN2_PRETOKENIZER


def test_batch_speeds_count_only_tokens_after_the_last_prefill():
    # two sequences, 4-token prompts, 3 decode tokens each; one started decoding early
    firsts, finishes = [1.0, 2.0], [4.0, 5.0]
    token_times = [1.0, 1.5, 1.8, 3.0, 2.0, 3.0, 4.0, 5.0]
    r = compare.batch_speeds(0.0, firsts, finishes, token_times, 4, 3)
    assert r["batch_prefill_tps"] == pytest.approx(2 * 4 / 2.0)
    assert r["batch_decode_tps"] == pytest.approx(4 / 3.0)      # tokens at 3, 3, 4, 5 in (2, 5]
    assert r["batch_tps"] == pytest.approx(2 * (4 + 3) / 5.0)


def test_rounds_merge_to_medians_and_the_largest_memory():
    rows = [{"label": "x", "framework": "vlmc", "decode_tps": d, "prompt_tps": 100.0, "max_rss_bytes": m,
             "load_average_before": [i], "load_average_after": [i], "round": i, "text_samples": [{"ttft_s": 1.0}]}
            for i, (d, m) in enumerate([(10.0, 5), (30.0, 7), (20.0, 6)])]
    rows[1].update(image_ttft_ms=900.0, image_prompt_tokens=70)      # only one round had the image request
    rows.append({"label": "x", "framework": "vlmc", "error": "timed out", "round": 3})
    m = compare.merge_rounds(rows)
    assert m["decode_tps"] == 20.0 and m["max_rss_bytes"] == 7 and m["failed_rounds"] == ["round 4: timed out"]
    assert m["image_ttft_ms"] == 900.0 and m["image_prompt_tokens"] == 70
    assert m["load_average_before"] == [0] and m["load_average_after"] == [2] and len(m["rounds"]) == 4
    assert "text_samples" not in m and "round" not in m          # the samples stay in their round's row
    assert "error" in compare.merge_rounds([{"label": "x", "error": "e"}, {"label": "x", "error": "e"}])
    assert compare.merge_rounds(rows[:1]) is rows[0]


def test_every_job_runs_once_in_every_position():
    jobs = [("py", name, {"label": name}) for name in ("vlmc", "mlx-vlm", "transformers")]
    orders = [[j[1] for j in compare.round_order(jobs, r)] for r in range(3)]
    for name in ("vlmc", "mlx-vlm", "transformers"):
        assert sorted(o.index(name) for o in orders) == [0, 1, 2]
    assert compare.round_order(jobs, 3) == jobs and compare.round_order([], 1) == []


def test_ratio_lines_include_the_batched_run():
    a = {"label": "vlmc q4", "framework": "vlmc", "decode_tps": 30.0, "prompt_tps": 200.0, "image_ttft_ms": 5000.0,
         "batch": 8, "batch_tps": 100.0, "batch_decode_tps": 60.0, "max_rss_bytes": 2}
    b = {"label": "llama.cpp Q4_K_M", "framework": "llama.cpp", "decode_tps": 15.0, "prompt_tps": 100.0,
         "image_ttft_ms": 10000.0, "batch": 8, "batch_tps": 50.0, "batch_decode_tps": 30.0, "max_rss_bytes": 4}
    (line,) = [x for x in compare.ratio_lines([a, b]) if x.startswith("  ")]
    assert "decode 2.00x" in line and "prefill 2.00x" in line and "image TTFT 2.00x" in line
    assert "batch 8 total 2.00x" in line and "batch 8 generation 2.00x" in line and "max RSS 0.50x" in line


def test_jobs_alternate_between_frameworks():
    jobs = [("py", "vlmc", {"label": "q4"}), ("py", "vlmc", {"label": "q8"}), ("py", "mlx-vlm", {"label": "m"}),
            ("py", "llama.cpp", {"label": "Q4"}), ("py", "llama.cpp", {"label": "Q8"})]
    assert [j[2]["label"] for j in compare.interleave(jobs)] == ["q4", "m", "Q4", "q8", "Q8"]


def _row(label: str, framework: str, decode: float, **kw):
    return {"label": label, "framework": framework, "version": "1", "dtype": "q4", "prompt_tps": 50.0,
            "ttft_ms": 2560.0, "decode_tps": decode, "load_average_before": [1.0], "load_average_after": [1.0], **kw}


def test_tables_from_files_of_both_former_layouts(tmp_path):
    # rows as the former compare.py wrote them (a round count, each round's decode speed,
    # failed rounds as text) and as the llama.cpp comparison did (each round's row, a count)
    meta = {"checkpoint": "/ck", "prompt_tokens": 128, "decode_tokens": 32, "image_size": 0, "runs": 1,
            "rounds": 2, "cpu_count": 2}
    old = {"meta": {**meta, "image_runs": 1, "image_rounds": 1},
           "results": [_row("vlmc q4", "vlmc", 6.0, rounds=2, round_decode_tps=[7.5, 4.5],
                            failed_rounds=["round 1: timed out"])]}
    lc_rounds = [_row("llama.cpp Q4_K_M", "llama.cpp", d, batch_tps=5.0) for d in (2.0, 4.0)]
    lc_row = _row("llama.cpp Q4_K_M", "llama.cpp", 3.0, rounds=lc_rounds, failed_rounds=0, gguf="/g/model-Q4_K_M.gguf",
                  tools={"llama-bench": [{"max_rss_bytes": 2e9}]}, threads=2)
    new = {"meta": {**meta, "batch": 0, "threads": 2}, "results": [lc_row]}
    (tmp_path / "a.json").write_text(json.dumps(old))
    (tmp_path / "b.json").write_text(json.dumps(new))
    table = compare.format_table(old["results"] + new["results"], meta)
    assert "decode tok/s by round: vlmc q4: 7.50, 4.50" in table
    assert "failed rounds (left out of the medians): vlmc q4 round 1: timed out" in table
    assert "  llama.cpp Q4_K_M: 2.00 | 50.0 | - | 5.0;  4.00 | 50.0 | - | 5.0" in table
    assert "vlmc q4 / llama.cpp Q4_K_M: decode 2.00x" in table
    merged = tmp_path / "m.json"
    compare.print_merged([tmp_path / "a.json", tmp_path / "b.json"], merged)   # no batch = batch 0
    assert [r["label"] for r in json.loads(merged.read_text())["results"]] == ["vlmc q4", "llama.cpp Q4_K_M"]
