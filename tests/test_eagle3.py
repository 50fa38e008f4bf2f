"""EAGLE-3 drafters in the speculators format: the target returns the hidden states entering
the layers the drafter names (transformers' ``hidden_states[j]``, vLLM's indices, in
increasing layer order; the default layers when it names none), the drafter's logits and
greedy drafts match a torch forward of the published architecture on the same states, greedy
output with EAGLE-3 speculation is the target's own, and malformed drafters or mismatched
targets are one clear error."""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import vlmc
from vlmc.errors import InputError, VlmcError
from vlmc.runtime.eagle3 import Eagle3Drafter, Eagle3Model
from vlmc.runtime.step import Sequences

FAMILY = "qwen2_5_vl"      # a 3-layer fixture: layers 0, 1, 2 can all be captured
LAYERS = [2, 0, 1]         # not sorted: fc takes the states in increasing layer order all the same
DRAFT_VOCAB = 48


def _eagle3_checkpoint(out: Path, *, hidden: int, vocab: int, layers=LAYERS, seed: int = 0,
                       drop: tuple[str, ...] = (), target_hidden: int | None = None,
                       norm_before_residual: bool = False, own_embeddings: bool = False, **extra) -> dict:
    """A random EAGLE-3 checkpoint as speculators saves one (config.json + safetensors);
    ``layers`` None: a config without layer ids; ``extra``: further config keys."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, heads, kv, hd, ff = hidden, 4, 2, hidden // 4, 2 * hidden
    th = target_hidden or hidden

    def rnd(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    keep = torch.randperm(vocab, generator=g)[:DRAFT_VOCAB].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[keep] = True
    tensors = {
        "fc.weight": rnd(h, 3 * th), "norm.weight": 1 + rnd(h), "lm_head.weight": rnd(DRAFT_VOCAB, h, std=0.6),
        "d2t": (keep - torch.arange(DRAFT_VOCAB)).to(torch.int64), "t2d": t2d,
        "layers.0.input_layernorm.weight": 1 + rnd(h), "layers.0.hidden_norm.weight": 1 + rnd(h),
        "layers.0.post_attention_layernorm.weight": 1 + rnd(h),
        "layers.0.self_attn.q_proj.weight": rnd(heads * hd, 2 * h),
        "layers.0.self_attn.k_proj.weight": rnd(kv * hd, 2 * h),
        "layers.0.self_attn.v_proj.weight": rnd(kv * hd, 2 * h), "layers.0.self_attn.o_proj.weight": rnd(h, heads * hd),
        "layers.0.mlp.gate_proj.weight": rnd(ff, h), "layers.0.mlp.up_proj.weight": rnd(ff, h),
        "layers.0.mlp.down_proj.weight": rnd(h, ff)}
    if own_embeddings:
        tensors["embed_tokens.weight"] = rnd(vocab, h, std=0.5)
    for name in drop:
        tensors.pop(name)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    config = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "draft_vocab_size": DRAFT_VOCAB,
        "norm_before_residual": norm_before_residual, "target_hidden_size": target_hidden,
        **({} if layers is None else {"eagle_aux_hidden_state_layer_ids": layers}), **extra,
        "speculators_config": {"algorithm": "eagle3", "verifier": {"name_or_path": "tiny-target"}},
        "transformer_layer_config": {
            "model_type": "llama", "hidden_size": h, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": hd, "intermediate_size": ff, "num_hidden_layers": 1, "vocab_size": vocab,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096, "hidden_act": "silu"}}
    (out / "config.json").write_text(json.dumps(config))
    return {k: v.double() if v.dtype != torch.bool else v for k, v in tensors.items()}


def _reference_drafts(w: dict, embed: np.ndarray, aux: np.ndarray, context: list[int], k: int,
                      norm_before_residual: bool = False, prompt_embeds: np.ndarray | None = None) -> list[np.ndarray]:
    """The speculators EAGLE-3 forward in float64 torch: row p = (embedding of token p + 1,
    fc(captured states at p)); each draft appends (embedding of the drafted token, the layer's
    last output). ``prompt_embeds``: the rows of the first context positions as the target
    took them (image features merged). Returns each draft step's logits over the draft
    vocabulary."""
    import torch
    import torch.nn.functional as F

    def rms(x, wt):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * wt

    p = "layers.0."
    heads, kv = 4, 2
    h = w["fc.weight"].shape[0]
    hd = h // heads
    emb_t = torch.tensor(embed, dtype=torch.float64)

    def layer(e, x):
        n = x.shape[0]
        hn = rms(x, w[p + "hidden_norm.weight"])
        z = torch.cat([rms(e, w[p + "input_layernorm.weight"]), hn], -1)
        q = (z @ w[p + "self_attn.q_proj.weight"].T).view(n, heads, hd).transpose(0, 1)
        kk = (z @ w[p + "self_attn.k_proj.weight"].T).view(n, kv, hd).transpose(0, 1)
        v = (z @ w[p + "self_attn.v_proj.weight"].T).view(n, kv, hd).transpose(0, 1)
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

        def rot(t):
            return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin
        q, kk = rot(q), rot(kk)
        kk, v = kk.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
        a = F.scaled_dot_product_attention(q[None], kk[None], v[None], is_causal=True)[0]
        a = a.transpose(0, 1).reshape(n, heads * hd) @ w[p + "self_attn.o_proj.weight"].T
        x = (hn if norm_before_residual else x) + a
        m = rms(x, w[p + "post_attention_layernorm.weight"])
        m = F.silu(m @ w[p + "mlp.gate_proj.weight"].T) * (m @ w[p + "mlp.up_proj.weight"].T)
        return x + m @ w[p + "mlp.down_proj.weight"].T

    d2t = w["d2t"].long()
    n = aux.shape[0]
    tokens = list(context[1:n + 1])
    hidden = torch.tensor(aux, dtype=torch.float64) @ w["fc.weight"].T
    given = 0 if prompt_embeds is None else prompt_embeds.shape[0]

    def rows():
        e = emb_t[tokens]
        if given > 1:
            e[:given - 1] = torch.tensor(prompt_embeds[1:given], dtype=torch.float64)
        return e
    out = []
    for _ in range(k):
        y = layer(rows(), hidden)
        logits = rms(y[-1], w["norm.weight"]) @ w["lm_head.weight"].T
        out.append(logits.numpy())
        d = int(logits.argmax())
        tokens.append(d + int(d2t[d]))
        hidden = torch.cat([hidden, y[-1:]], 0)
    return out


@pytest.fixture(scope="module")
def target_ckpt(tmp_path_factory):
    from fixtures.checkpoints import build_checkpoint
    root = tmp_path_factory.mktemp("eagle3")
    build_checkpoint(root / "target", FAMILY)
    return root / "target"


@pytest.fixture(scope="module")
def setup(target_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3d")
    cfg = json.loads((target_ckpt / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    weights = _eagle3_checkpoint(root / "eagle", hidden=int(text["hidden_size"]), vocab=int(text["vocab_size"]))
    target = vlmc.compile(target_ckpt, root / "target_art")
    drafter = vlmc.compile(root / "eagle", root / "eagle_art")
    return {"target": target, "drafter": drafter, "weights": weights, "root": root}


def _hf_states(ckpt: Path, ids: list[int]) -> tuple[tuple, np.ndarray]:
    """transformers' ``hidden_states`` (index 0: the embeddings, j: the output of layer j - 1,
    the last one after the final norm) and the input of the final norm."""
    import torch
    from fixtures.checkpoints import hf_model
    hf = hf_model(ckpt, FAMILY)
    norm = hf.get_decoder().norm
    seen = []
    hook = norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0].numpy().copy()))
    try:
        with torch.no_grad():
            states = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    return tuple(s[0].numpy() for s in states), seen[-1]


def _captured(m, text: str = "The river runs past the old mill.") -> tuple[list[int], np.ndarray]:
    p = m.build_prompt(text)
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(p)])
    seqs.prefill()
    first, aux = seqs.hidden
    assert first == 0 and aux.shape[1] == len(p.ids)
    return list(p.ids), np.asarray(aux[0])


def test_target_returns_the_hidden_states_entering_the_named_layers(setup, target_ckpt):
    """The layer ids as vLLM reads them: id j is the state entering layer j, transformers'
    ``hidden_states[j]`` (not the output of layer j, ``hidden_states[j + 1]``, which some
    training scripts captured), and the states are concatenated in increasing layer order
    whatever order the config lists them in (vLLM appends them as its layer loop meets them)."""
    draft = vlmc.load(setup["drafter"])
    m = vlmc.load(setup["target"], draft=draft)
    assert m.meta["captured_layers"] == sorted(LAYERS) == [0, 1, 2]
    ids, aux = _captured(m)
    ref, _ = _hf_states(target_ckpt, ids)
    h = ref[0].shape[-1]
    assert aux.shape[-1] == len(LAYERS) * h
    for i, j in enumerate(sorted(LAYERS)):
        np.testing.assert_allclose(aux[:, i * h:(i + 1) * h], ref[j], rtol=1e-4, atol=1e-4)


def test_default_layers_and_the_last_layers_output(setup, target_ckpt, tmp_path):
    """A config without layer ids reads layers 2, n // 2 and n - 3 of an n-layer target (the
    default of vLLM, SGLang, EAGLE and speculators alike); id n, one past the last layer, is
    the last layer's output before the final norm (vLLM's index for it)."""
    from vlmc.runtime.eagle3 import default_layers
    assert default_layers(32) == [2, 16, 29] and default_layers(36) == [2, 18, 33]   # Llama-3.1-8B, Qwen3-8B
    h, v = (int(setup["weights"]["fc.weight"].shape[1]) // 3, int(setup["weights"]["t2d"].shape[0]))
    n = 3
    cases = {"default": (None, [0, 1, 2]), "last": ([3, 1, 0], [0, 1, 3])}
    for name, (layers, want) in cases.items():
        _eagle3_checkpoint(tmp_path / name, hidden=h, vocab=v, layers=layers)
        draft = vlmc.load(vlmc.compile(tmp_path / name, tmp_path / f"{name}_art"))
        m = vlmc.load(setup["target"], draft=draft)
        assert int(m.meta["text"]["num_layers"]) == n and m.meta["captured_layers"] == want, name
        ids, aux = _captured(m)
        ref, pre_norm = _hf_states(target_ckpt, ids)
        for i, j in enumerate(want):
            np.testing.assert_allclose(aux[:, i * h:(i + 1) * h], pre_norm if j == n else ref[j],
                                       rtol=1e-4, atol=1e-4)
    assert not np.allclose(pre_norm, ref[n], atol=1e-2)     # transformers' last state is after the norm


@pytest.mark.parametrize("variant", ["text", "image", "norm_before_residual+own_embeddings"])
def test_drafts_match_the_reference_forward(setup, tmp_path, variant):
    from fixtures.checkpoints import make_test_image
    weights, drafter_art = setup["weights"], setup["drafter"]
    own = variant.startswith("norm_before_residual")
    if own:
        h, v = int(weights["fc.weight"].shape[0]), int(weights["t2d"].shape[0])
        weights = _eagle3_checkpoint(tmp_path / "e", hidden=h, vocab=v, norm_before_residual=True,
                                     own_embeddings=True, seed=1)
        drafter_art = vlmc.compile(tmp_path / "e", tmp_path / "e_art")
    draft = vlmc.load(drafter_art)
    assert isinstance(draft, Eagle3Model)
    m = vlmc.load(setup["target"], draft=draft)
    drafter = m.speculation.drafter
    assert isinstance(drafter, Eagle3Drafter)
    images = [make_test_image(100, 70, seed=3)] if variant == "image" else None
    p = m.build_prompt("Tell me about the mill by the river.", images=images)
    inputs = m.prompt_inputs(p)
    seqs = Sequences.start(m.decoder, [inputs])
    logits = seqs.prefill()
    context = list(p.ids) + [int(mx.argmax(logits[0]).item())]
    state = drafter.start(p.ids, p, seqs)
    aux = np.asarray(seqs.hidden[1][0], dtype=np.float64)
    k = 5
    got = drafter.propose(state, context, k)
    table = weights["embed_tokens.weight"].numpy() if own else \
        np.asarray(m.model.params["text.embed_tokens.weight"], dtype=np.float64)
    ref = _reference_drafts(weights, table, aux, context, k, norm_before_residual=own,
                            prompt_embeds=None if own else np.asarray(inputs.embeds[0], dtype=np.float64))
    d2t = weights["d2t"].numpy()
    assert got.tokens == [int(r.argmax()) + int(d2t[int(r.argmax())]) for r in ref]
    for have, want in zip(state.logits, ref):
        np.testing.assert_allclose(np.asarray(have), want, rtol=1e-4, atol=1e-4)
    # the drafter's cache follows the context: its own rows are gone, a second proposal agrees
    assert state.caches[0].offset == len(context) - 1
    assert drafter.propose(state, context, k).tokens == got.tokens


def test_greedy_output_with_eagle3_is_the_targets(setup):
    plain = vlmc.load(setup["target"])
    m = vlmc.load(setup["target"], draft=str(setup["drafter"]), num_draft_tokens=3)
    from fixtures.checkpoints import make_test_image
    image = make_test_image(100, 70, seed=3)
    for case in (dict(prompt="Describe the picture.", images=[image]),
                 dict(prompt="Tell me a short story about the river. " * 3)):
        want = plain.generate(max_tokens=24, **case)
        got = m.generate(max_tokens=24, **case)
        assert got.token_ids == want.token_ids, case
    stats = list(m.stream_generate("Tell me a story.", max_tokens=16))[-1].stats
    assert stats["draft_proposed"] > 0
    # KV options re-plan the target and capture its states in the same re-plan
    plain8 = vlmc.load(setup["target"], kv_bits=8)
    m8 = vlmc.load(setup["target"], draft=str(setup["drafter"]), kv_bits=8)
    case = dict(prompt="Tell me a short story about the river.", max_tokens=16)
    assert m8.meta["captured_layers"] == sorted(LAYERS) and m8.kv_plan == plain8.kv_plan
    assert m8.generate(**case).token_ids == plain8.generate(**case).token_ids


def test_malformed_drafters_and_mismatched_targets_are_clear_errors(setup, target_ckpt, tmp_path):
    cfg = json.loads((target_ckpt / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    h, v = int(text["hidden_size"]), int(text["vocab_size"])
    _eagle3_checkpoint(tmp_path / "no_d2t", hidden=h, vocab=v, drop=("d2t",))
    with pytest.raises(VlmcError, match="lacks 'd2t'"):
        vlmc.compile(tmp_path / "no_d2t", tmp_path / "a1")
    _eagle3_checkpoint(tmp_path / "wide", hidden=h, vocab=v, target_hidden=2 * h)
    wide = vlmc.load(vlmc.compile(tmp_path / "wide", tmp_path / "a2"))
    with pytest.raises(InputError, match="hidden states of width"):
        vlmc.load(setup["target"], draft=wide)
    for i, layers in enumerate(([0, 1, 4], [0, 1, 1])):     # past the 3-layer target's output; twice the same
        _eagle3_checkpoint(tmp_path / f"deep{i}", hidden=h, vocab=v, layers=layers)
        with pytest.raises(InputError, match="reads layers"):
            vlmc.load(setup["target"], draft=vlmc.load(vlmc.compile(tmp_path / f"deep{i}", tmp_path / f"a3{i}")))
    for key in ("norm_before_fc", "fc_norm", "norm_output"):   # speculators options not built: refused
        _eagle3_checkpoint(tmp_path / key, hidden=h, vocab=v, **{key: True})
        with pytest.raises(VlmcError, match=f"EAGLE-3 drafters with {key} "):
            vlmc.compile(tmp_path / key, tmp_path / f"{key}_art")
    from vlmc.runtime.batcher import Batcher
    m = vlmc.load(setup["target"], draft=vlmc.load(setup["drafter"]))
    with pytest.raises(InputError, match="batching loop"):
        Batcher(m, speculation=m.speculation)
    plain = vlmc.load(setup["target"])   # loaded without the drafter: no captured states
    with pytest.raises(InputError, match="does not return the hidden states"):
        plain.generate("Hi", max_tokens=2, draft=vlmc.load(setup["drafter"]))


def test_the_drafters_cache_follows_accepted_steps(setup):
    """Steps of every kind (verify with some drafts rejected, plain decode steps) leave the
    drafter in the state a fresh one reaches on the same context in one prefill."""
    m = vlmc.load(setup["target"], draft=vlmc.load(setup["drafter"]))
    drafter = m.speculation.drafter
    p = m.build_prompt("Tell me about the mill by the river.")
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(p)])
    context = list(p.ids) + [int(mx.argmax(seqs.prefill()[0]).item())]
    state = drafter.start(p.ids, p, seqs)
    drafter.propose(state, context, 3)
    rows = seqs.verify(mx.array([[context[-1], 5, 6, 7]], dtype=mx.int32))[0]
    seqs.trim(2)                                     # kept: the last token and draft 5
    context += [5, int(mx.argmax(rows[1]).item())]
    drafter.accepted(state, context[:-1])
    rows = seqs.decode(mx.array([context[-1]], dtype=mx.int32))   # a step without a draft
    context.append(int(mx.argmax(rows[0]).item()))
    drafter.accepted(state, context[:-1])
    got = drafter.propose(state, context, 4)
    got_logits = [np.asarray(x) for x in state.logits]

    fresh = Sequences.start(m.decoder, [m.prompt_inputs(p)])    # the same context, prefilled then one step
    fresh.prefill()
    prompt_rows = np.asarray(fresh.hidden[1])
    fresh.verify(mx.array([context[len(p.ids):-1]], dtype=mx.int32))
    full = np.concatenate([prompt_rows, np.asarray(fresh.hidden[1])], axis=1)
    want = _reference_drafts(setup["weights"], np.asarray(m.model.params["text.embed_tokens.weight"], np.float64),
                             full[0].astype(np.float64), context, 4)
    d2t = setup["weights"]["d2t"].numpy()
    assert got.tokens == [int(r.argmax()) + int(d2t[int(r.argmax())]) for r in want]
    for have, ref in zip(got_logits, want):
        np.testing.assert_allclose(have, ref, rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("family,layers", [("llava", [1, 0]), ("qwen3_5", [3, 1, 4])])
def test_captured_states_on_other_decoders(tmp_path, family, layers):
    """``capture_hidden`` on a Llama decoder (LLaVA) and on a hybrid stack whose layers
    several blocks hold (Qwen3.5: linear- and full-attention layers): the states entering
    the named layers are transformers' ``hidden_states`` there, in increasing layer order."""
    import torch
    from vlmc.api import Model
    from vlmc.compiler import replan
    from vlmc.runtime.artifact import load_artifact
    if family == "llava":
        from fixtures.checkpoints import build_checkpoint, hf_model
        build_checkpoint(tmp_path / "ckpt", "llava", variant="clip")
        hf = hf_model(tmp_path / "ckpt", "llava")
    else:
        from fixtures import qwen3_5 as q35
        q35.build_qwen3_5_checkpoint(tmp_path / "ckpt")
        hf = q35.hf_model(tmp_path / "ckpt")
    m = Model(load_artifact(replan(vlmc.compile(tmp_path / "ckpt", tmp_path / "art"), capture=layers)))
    p = m.build_prompt("The river runs past the old mill.")
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(p)])
    seqs.prefill()
    aux = seqs.hidden[1]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([p.ids]), output_hidden_states=True).hidden_states
    h = ref[0].shape[-1]
    assert aux.shape == (1, len(p.ids), len(layers) * h)
    for i, j in enumerate(sorted(layers)):
        np.testing.assert_allclose(np.asarray(aux[0, :, i * h:(i + 1) * h]), ref[j][0].numpy(), rtol=1e-4, atol=1e-4)
    out = seqs.decode(mx.array([7], dtype=mx.int32))           # decode steps return one row each
    assert out.shape[0] == 1 and seqs.hidden[1].shape == (1, 1, len(layers) * h) and seqs.hidden[0] == len(p.ids)


def test_the_cli_drafts_with_an_eagle3_drafter(setup, tmp_path):
    from click.testing import CliRunner
    from vlmc.cli import main

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    ask = ["run", setup["target"], "-p", "Tell me a story about the river.", "--max-tokens", "12"]
    plain = run(*ask)
    spec = run(*ask, "--draft-model", setup["drafter"], "-v")
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert "speculation:" in spec.output and spec.output.startswith(plain.output.rstrip("\n"))
    alone = run("run", setup["drafter"], "-p", "Hi")
    assert alone.exit_code != 0 and "give it to a target with --draft-model" in alone.output
    cfg = json.loads((setup["root"] / "eagle" / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "draft_vocab_size": 0}))
    (bad / "model.safetensors").write_bytes((setup["root"] / "eagle" / "model.safetensors").read_bytes())
    out = run("compile", bad, "-o", tmp_path / "bad_art")
    assert out.exit_code != 0 and "error: an EAGLE-3 config needs a positive draft_vocab_size" in out.output
