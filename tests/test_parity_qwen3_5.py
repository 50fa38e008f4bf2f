"""Qwen3.5 (dense, hybrid linear attention) against transformers, on the tiny checkpoints
of ``tests/fixtures/qwen3_5.py``.

Parity (as ``test_parity.py``): prompt ids equal to transformers' processor, patches within
1e-5, float32 logits within 1e-4 at the last prompt position and at each of 16 greedy
steps, the 16 greedy tokens identical: text, one image, two images, an image in an earlier
turn, both config layouts. Then the hybrid stack layer by layer against transformers'
recurrent (token by token) and chunked forms, chunked prefill, ragged batches equal to
serial runs, greedy decoding with prompt-lookup drafts equal to without (verify steps
rewound through the recurrent states), the template's thinking default, the plan that
``vlmc inspect`` shows, and prefix caching refused with its reason.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import vlmc  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import qwen3_5 as q35  # noqa: E402
from test_parity import CASES, GREEDY_STEPS, LOGIT_ATOL, check_inputs, check_outputs, run_vlmc  # noqa: E402
from vlmc.compiler import compile as vlmc_compile  # noqa: E402

CASE_NAMES = ["text", "one_image", "two_images", "multi_turn"]


def _case(name):
    messages, sizes = CASES[name]
    return messages, [ck.make_test_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]


class Store:
    def __init__(self, root: Path):
        self.root = root
        self.ckpts, self.arts, self.models, self.hf, self.refs = {}, {}, {}, {}, {}

    def ckpt(self, **kw):
        key = tuple(sorted(kw.items()))
        if key not in self.ckpts:
            name = "_".join(["qwen3_5"] + [f"{k}-{v}" for k, v in sorted(kw.items())])
            self.ckpts[key] = q35.build_qwen3_5_checkpoint(self.root / "ckpt" / name, **kw)
        return self.ckpts[key]

    def vlm(self, info, **kw):
        kw = {"target": "cpu", **kw}
        key = (info["path"], tuple(sorted(kw.items())))
        if key not in self.models:
            tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
            art = vlmc_compile(info["path"], self.root / "art" / f"{Path(info['path']).name}-{tag}", **kw)
            self.arts[key] = art
            self.models[key] = vlmc.load(art)
        return self.models[key]

    def hf_model(self, info):
        if info["path"] not in self.hf:
            self.hf[info["path"]] = (q35.hf_processor(info["path"]), q35.hf_model(info["path"]))
        return self.hf[info["path"]]

    def ref(self, info, case):
        key = (info["path"], case)
        if key not in self.refs:
            proc, model = self.hf_model(info)
            messages, images = _case(case)
            self.refs[key] = q35.hf_reference(info["path"], messages, images, greedy_steps=GREEDY_STEPS,
                                              processor=proc, model=model)
        return self.refs[key]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.set_num_threads(2)
    return Store(tmp_path_factory.mktemp("qwen3_5"))


def build_prompt(m, case):
    messages, images = _case(case)
    return m.build_prompt(messages=messages, images=images)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", CASE_NAMES)
def test_parity(store, case):
    info = store.ckpt()
    ref = store.ref(info, case)
    m = store.vlm(info)
    p = build_prompt(m, case)
    check_inputs(p, ref, "qwen3_5")
    toks, logits = run_vlmc(m, [p])
    check_outputs(toks[0], logits[0], ref, f"qwen3_5/{case}")


def test_v4_layout(store):
    info = store.ckpt(layout="v4")
    ref = store.ref(store.ckpt(), "one_image")  # the same weights (seed 0)
    m = store.vlm(info)
    toks, logits = run_vlmc(m, [build_prompt(m, "one_image")])
    check_outputs(toks[0], logits[0], ref, "qwen3_5/v4/one_image")
