"""The ``vlmc`` command: compile, run, inspect.

User mistakes (bad paths, unsupported models, broken images, over-long prompts) print
one ``error:`` line and exit 1; only bugs in vlmc show a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import VlmcError, exit_on_user_error
from .cli_options import kv_flags, pop_kv
from .options import FUSIONS, OPT_IN_FUSIONS as OPT_IN


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vlmc")
def main() -> None:
    """vlmc: compile vision-language models to MLX artifacts and run them."""
    _plain_warnings()


def _plain_warnings() -> None:
    """vlmc's own warnings (PerformanceWarning) as one ``warning:`` line on stderr, like
    errors, instead of Python's file:line form with a source line."""
    import warnings
    from .errors import PerformanceWarning
    default = warnings.showwarning
    if getattr(default, "vlmc", False):  # installed by an earlier command in this process
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PerformanceWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            default(message, category, filename, lineno, file, line)
    show.vlmc = True
    warnings.showwarning = show


DTYPE = click.Choice(["float32", "bfloat16", "float16"])
TARGET = click.Choice(["cpu", "metal", "cuda"])


@main.command("compile")
@click.argument("src")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Artifact folder to write (default: the compile cache).")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True, help="Weight storage dtype.")
@click.option("--target", type=TARGET, default=None, help="Target backend (default: this machine's).")
@click.option("--passes", "preset", default="default", show_default=True, help="Pass preset: default or none.")
@click.option("-q", "--quantize", default=None, help="Weight scheme: q2 q3 q4 q5 q6 q8 mxfp4 mxfp8 nvfp4.")
@click.option("--group-size", default=64, show_default=True, type=int, help="Affine group size: 32, 64, 128.")
@click.option("--quantize-vision/--no-quantize-vision", default=True, show_default=True,
              help="Quantize the vision tower and projector too.")
@click.option("--head", default="auto", show_default=True,
              help="Scheme for embeddings and LM head: auto (q6 under q2-q4, q8 under q5-q6, mxfp8 under mxfp4/nvfp4), none (float), or a scheme.")
@click.option("--recipe", type=click.Choice(["uniform", "mixed"]), default="uniform", show_default=True,
              help="mixed: first/last decoder layers, v_proj and down_proj at 6 bits (8 for q2/q3).")
@click.option("--quant-params", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="dtype of affine codes' scales and biases (auto: bfloat16 for --target cpu "
                                      "under float32 weights, else the weights' dtype).")
@click.option("--quantize-activations", is_flag=True,
              help="With -q mxfp8/nvfp4 and --target cuda: round each quantized linear layer's input to its "
                   "weight's format too (MLX's qqmm on the GPU; emulated where it cannot run).")
@click.option("--no-fuse", "no_fuse", multiple=True, type=click.Choice(list(FUSIONS)),
              help="Turn a fusion off (repeatable), e.g. to measure its effect.")
@click.option("--fuse", "fuse", multiple=True, type=click.Choice(list(OPT_IN)),
              help="Turn on a fusion that is off by default (repeatable).")
@kv_flags
@exit_on_user_error
def compile_cmd(src: str, out: Path | None, dtype: str, target: str | None, preset: str, quantize: str | None,
                group_size: int, quantize_vision: bool, head: str, recipe: str, quant_params: str,
                quantize_activations: bool, no_fuse: tuple[str, ...], fuse: tuple[str, ...], **kv_kw) -> None:
    """Compile SRC (a checkpoint folder or Hugging Face hub id) into an MLX artifact."""
    from .compiler import compile as compile_checkpoint
    path = compile_checkpoint(src, out, dtype=dtype, target=target, preset=preset, quantize=quantize,
                              group_size=group_size, quantize_vision=quantize_vision, head=head, recipe=recipe,
                              no_fuse=no_fuse, fuse=fuse, quantize_activations=quantize_activations,
                              quant_params=quant_params, progress=True,
                              **pop_kv(kv_kw))
    click.echo(str(path))


@main.command("quality")
@click.argument("candidate")
@click.option("--reference", required=True, help="The artifact to compare against (usually the float32 one).")
@click.option("--steps", default=32, show_default=True, type=int, help="Teacher-forced positions per prompt.")
@exit_on_user_error
def quality_cmd(candidate: str, reference: str, steps: int) -> None:
    """Top-1 agreement and KL of CANDIDATE vs REFERENCE on fixed prompts, plus per-layer
    weight reconstruction error of quantized weights."""
    from .api import load
    from .quality import compare
    cand, ref = load(candidate), load(reference)
    report = compare(ref, cand, steps=steps)
    quantized = cand.artifact.manifest.get("quantized", {})
    if quantized:
        click.echo(f"{'weight':<56} {'scheme':<9} {'rel.err':>8}")
        for name, q in sorted(quantized.items(), key=lambda kv: -kv[1]["rel_error"]):
            click.echo(f"{name:<56} {_scheme_label(q):<9} {q['rel_error']:>8.4f}")
    click.echo(f"positions {report.positions}  top-1 agreement {100 * report.top1_agreement:.2f}%  "
               f"mean KL {report.mean_kl:.5f}  max KL {report.max_kl:.5f}")


def _default_model() -> str:
    from .demo import MODEL_DIR
    if not (MODEL_DIR / "config.json").is_file():
        raise VlmcError(f"the bundled demo model is missing from this install ({MODEL_DIR}); pass a model")
    return str(MODEL_DIR)


class _MediaInOrder(click.Command):
    """Records the order in which -i/--image and --video were given (click gathers each
    repeated option into its own tuple), so images and videos reach the prompt as typed."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            _, _, order = self.make_parser(ctx).parse_args(args=list(args))
            ctx.meta["media_order"] = [p.name for p in order if p.name in ("images", "videos")]
        except click.ClickException:
            pass  # the real parse below reports it
        return super().parse_args(ctx, args)


def _media_in_order(images: tuple[str, ...], videos: tuple[str, ...], fps: float | None,
                    max_frames: int | None) -> list:
    from .runtime.video import VideoRef
    order = click.get_current_context().meta.get("media_order") or \
        ["images"] * len(images) + ["videos"] * len(videos)
    its = {"images": iter(images), "videos": iter(VideoRef(v, fps=fps, max_frames=max_frames) for v in videos)}
    return [next(its[name]) for name in order]


@main.command("run", cls=_MediaInOrder)
@click.argument("src", required=False)
@click.option("-p", "--prompt", required=True, help="The user message.")
@click.option("-i", "--image", "images", multiple=True, help="Image path, http(s) URL or data: URI (repeatable).")
@click.option("--video", "videos", multiple=True,
              help="Video (mp4/webm/mov/gif) path, http(s) URL or data: URI (repeatable; kept in order with -i).")
@click.option("--fps", default=None, type=click.FloatRange(min=0, min_open=True, max=240),
              help="Video frames sampled per second [default: the model's video processor, else 2].")
@click.option("--max-frames", default=None, type=click.IntRange(min=1),
              help="Most frames sampled from each video [default: the model's video processor].")
@click.option("--system", default=None, help="System message.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=None, type=float,
              help="0 = greedy [default: the checkpoint's generation_config.json, else greedy].")
@click.option("--top-p", default=None, type=float, help="[default: the checkpoint's, else 1 (off)]")
@click.option("--top-k", default=None, type=int, help="[default: the checkpoint's, else 0 (off)]")
@click.option("--min-p", default=None, type=float, help="[default: the checkpoint's, else 0 (off)]")
@click.option("--repetition-penalty", default=None, type=float, help="[default: the checkpoint's, else 1 (off)]")
@click.option("--generation-config", type=click.Choice(["auto", "vlmc"]), default="auto", show_default=True,
              help="auto: sampling fields left unset take the checkpoint's generation_config.json defaults; "
                   "vlmc: ignore them.")
@click.option("--seed", default=None, type=int)
@click.option("--prompt-lookup", is_flag=True,
              help="Speculate with prompt lookup: draft the tokens that followed the last n-gram earlier in the "
                   "prompt or reply, verify them in one step (lossless).")
@click.option("--ngram", default=3, show_default=True, type=click.IntRange(1, 16),
              help="Longest n-gram prompt lookup matches.")
@click.option("--draft-model", default=None,
              help="Speculate with this smaller model (artifact, checkpoint or hub id) with the same tokenizer.")
@click.option("--num-draft-tokens", default=4, show_default=True, type=click.IntRange(1, 15),
              help="Most tokens drafted per step (fewer when the acceptance rate says so).")
@click.option("--stop", "stops", multiple=True, help="Stop string (repeatable).")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True,
              help="Weight dtype when SRC must be compiled first.")
@click.option("-v", "--verbose", is_flag=True, help="Print token counts, speeds and peak memory.")
@kv_flags
@exit_on_user_error
def run_cmd(src: str, prompt: str, images: tuple[str, ...], videos: tuple[str, ...], fps: float | None,
            max_frames: int | None, system: str | None, max_tokens: int,
            temperature: float | None, top_p: float | None, top_k: int | None, min_p: float | None,
            repetition_penalty: float | None, generation_config: str, seed: int | None, prompt_lookup: bool,
            ngram: int, draft_model: str | None, num_draft_tokens: int, stops: tuple[str, ...],
            dtype: str, verbose: bool, **kv_kw) -> None:
    """Generate a reply from SRC (an artifact, a checkpoint folder or a hub id; checkpoints
    are compiled once and cached). Without SRC, the bundled demo model (synthetic shapes)."""
    from .api import load
    src = src or _default_model()
    draft = None
    if draft_model is not None and prompt_lookup:
        raise VlmcError("give either --draft-model or --prompt-lookup, not both")
    if draft_model is not None:
        draft = load(draft_model, dtype=dtype, progress=True)
    elif prompt_lookup:
        from .runtime.speculative import PromptLookup
        draft = PromptLookup(ngram=ngram)
    # given the drafter, the target loads as it needs (an EAGLE-3 drafter reads its hidden states)
    model = load(src, dtype=dtype, progress=True, generation_config=generation_config, draft=draft,
                 num_draft_tokens=num_draft_tokens, **pop_kv(kv_kw))
    if not hasattr(model, "sampling_params"):
        raise VlmcError(f"{src} is a drafter, not a model that generates: give it to a target with --draft-model")
    params = model.sampling_params(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                   repetition_penalty=repetition_penalty, seed=seed)
    last = None
    if (fps is not None or max_frames is not None) and not videos:
        raise VlmcError("--fps and --max-frames apply to videos; give one with --video")
    media = _media_in_order(images, videos, fps, max_frames)
    for chunk in model.stream_generate(prompt, images=media, system=system, max_tokens=max_tokens,
                                       stop=list(stops), sampling=params, draft=draft,
                                       num_draft_tokens=num_draft_tokens):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if verbose and last is not None:
        click.echo(run_summary(last.stats, last.finish_reason), err=True)
        source = "the checkpoint's generation_config.json where unset" if generation_config == "auto" and \
            model.sampling_defaults else "vlmc's defaults where unset"
        click.echo(f"sampling: {params.describe()} ({source})", err=True)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def run_summary(s: dict, finish: str | None) -> str:
    """``vlmc run -v``'s line: counts, the rates that were measured, peak memory in a unit
    that shows it. A reply of one token has no decode steps, so no generation rate."""
    prompt = _count(s["prompt_tokens"], "token") + (f", {s['prompt_tps']:.1f} tok/s" if s.get("prompt_tps") else "")
    gen = _count(s["generation_tokens"], "token")
    if s["generation_tokens"] > 1 and s.get("generation_tps"):
        gen += f", {s['generation_tps']:.1f} tok/s"
    gb = s["peak_memory_gb"]
    memory = f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1000:.1f} MB"
    spec = ""
    if "draft_proposed" in s:
        spec = (f" | speculation: {s['draft_accepted']}/{s['draft_proposed']} drafted tokens accepted "
                f"({100 * s['acceptance']:.0f}%), {s['tokens_per_step']:.2f} tokens per step")
    return f"prompt: {prompt} | generation: {gen}{spec} | peak memory {memory} | finish: {finish}"


@main.command("eval")
@click.argument("src", required=False)
@click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Images to use (default: the whole split).")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True)
@click.option("-q", "--quantize", default=None, help="Compile with this weight scheme first (see compile).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="Also write the result as JSON to this file ('-': stdout).")
@kv_flags
@exit_on_user_error
def eval_cmd(src: str | None, split: str, limit: int | None, dtype: str, quantize: str | None,
             json_out: Path | None, **kv_kw) -> None:
    """Exact-match accuracy on the demo task's held-out split (SRC: the demo model by default,
    or an artifact / checkpoint trained on it)."""
    from .api import load
    from .compiler import compile as compile_checkpoint
    from .evaluate import evaluate
    from .runtime.artifact import is_artifact
    src = src or _default_model()
    if quantize and not is_artifact(src):
        src = str(compile_checkpoint(src, dtype=dtype, quantize=quantize, progress=True))
    result = evaluate(load(src, dtype=dtype, **pop_kv(kv_kw)), split=split, limit=limit, progress=True)
    kinds = "  ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in result["per_kind"].items())
    click.echo(f"{split}: {100 * result['accuracy']:.2f}% exact match ({result['correct']}/{result['n']})  {kinds}",
               err=json_out is not None and str(json_out) == "-")
    if json_out:
        from .bench import write_json
        write_json(json_out, result)


@main.command("inspect")
@click.argument("src")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="Also write the manifest (an artifact) or the compiled program (a checkpoint) as JSON to "
                   "this file ('-': stdout, instead of the text).")
@click.option("--layers", is_flag=True, help="List every quantized weight with its scheme, size and error.")
@exit_on_user_error
def inspect_cmd(src: str, json_out: Path | None, layers: bool) -> None:
    """Print the IR, parameter counts and memory of an artifact or a checkpoint (or the
    bundled demo model, vlmc-demo)."""
    from .bench import write_json
    from .runtime.artifact import is_artifact, read_manifest, reject_unfinished
    to_stdout = json_out is not None and str(json_out) == "-"
    if is_artifact(src):
        manifest = read_manifest(Path(src))
        if json_out is not None:
            write_json(json_out, manifest)
        if to_stdout:
            return
        click.echo((Path(src) / "program.ir").read_text())
        click.echo(_memory_summary(manifest["tensors"], manifest.get("quantized", {})))
        click.echo(_quant_summary(manifest, layers))
        click.echo(_kv_summary(manifest))
        click.echo(_sampling_summary(Path(src)))
        return
    reject_unfinished(src)
    from .frontend import open_checkpoint
    from .ir.printer import format_program
    from .models import import_checkpoint
    from .passes import PRESETS, run_passes
    prog = run_passes(import_checkpoint(open_checkpoint(src)), PRESETS["default"])
    if json_out is not None:
        from .ir.serialize import to_json
        write_json(json_out, to_json(prog))
    if not to_stdout:
        click.echo(format_program(prog))


def _sampling_summary(art: Path) -> str:
    """The sampling defaults the checkpoint's generation_config.json gives (used where a
    request leaves a field unset, unless --generation-config vlmc)."""
    import json
    from .runtime.sampling import checkpoint_defaults, resolve_sampling
    try:
        gen = json.loads((art / "generation.json").read_text())
    except (OSError, ValueError):
        return ""
    defaults = checkpoint_defaults(gen.get("defaults") or {})
    eos = ", ".join(map(str, gen.get("eos_token_ids") or [])) or "none"
    if not defaults:
        return f"\nsampling defaults: none in generation_config.json (greedy unless asked); stop ids {eos}"
    return (f"\nsampling defaults (generation_config.json): {resolve_sampling({}, defaults).describe()}; "
            f"stop ids {eos}")


def _kv_summary(manifest: dict) -> str:
    """The KV-cache plan: layout and bytes per token of each layer, total at the context."""
    from .passes.kv_layout import describe
    layers = next(iter((manifest.get("kv_plan") or {}).values()), [])
    plan = manifest["meta"].get("kv_plan")
    if not plan:
        return "\nkv cache: dense (no plan recorded)"
    lines = ["", f"kv cache (batch 1): {plan['bytes_per_token']:,} B/token = {plan['ratio_to_dense_bfloat16']:.3f}x "
                 f"dense bf16; {plan['bytes_at_context'] / 2**20:,.1f} MiB at {plan['context']:,} tokens"]
    runs: list[list] = []
    for layer in layers:
        spec = layer["kv"] if isinstance(layer["kv"], dict) else {"layout": layer["kv"]}
        key = (describe(spec), spec.get("bytes_per_token"))
        if runs and runs[-1][0] == key:
            runs[-1][2] = layer["index"]
        else:
            runs.append([key, layer["index"], layer["index"]])
    for (what, bpt), first, last in runs:
        span = f"layer {first}" if first == last else f"layers {first}-{last}"
        if what.startswith("recurrent"):  # a fixed state per sequence, not per token
            per_seq = next(L["kv"]["bytes_per_sequence"] for L in layers if L["index"] == first)
            lines.append(f"  {span:<14} {what:<28} {per_seq:>8,} B/sequence")
        else:
            lines.append(f"  {span:<14} {what:<28} {bpt or 0:>8,} B/token")
    if plan.get("bytes_per_sequence"):
        lines.append(f"  recurrent states: {plan['bytes_per_sequence']:,} B per sequence "
                     f"({plan['recurrent_layers']} layers)")
        lines.append(f"  prefix cache: {plan['bytes_per_sequence']:,} B of recurrent states per stored block "
                     f"boundary (a prompt's end, a branch point), beside {plan['bytes_per_token']:,} B/token of KV")
    lines += [f"  note: {n}" for n in plan.get("notes", [])]
    return "\n".join(lines)


def _memory_summary(tensors: dict, quantized: dict) -> str:
    """Parameters (logical, before packing) and stored bytes per top-level group."""
    from .ir.core import dtype_size
    groups: dict[str, list[int]] = {}
    for name, t in tensors.items():
        n = 1
        for d in t["shape"]:
            n *= d
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] in quantized:
            n_params = 0
        elif name in quantized:
            n_params = n * 32 // quantized[name]["bits"]
        else:
            n_params = n
        g = groups.setdefault(name.split(".")[0], [0, 0])
        g[0] += n_params
        g[1] += n * dtype_size(t["dtype"])
    lines = ["", "weights:"]
    for g, (n, b) in sorted(groups.items()):
        lines.append(f"  {g:<10} {n:>14,} params {b / 2**20:>10.1f} MiB")
    total_n = sum(v[0] for v in groups.values())
    total_b = sum(v[1] for v in groups.values())
    lines.append(f"  {'total':<10} {total_n:>14,} params {total_b / 2**20:>10.1f} MiB")
    return "\n".join(lines)


def _scheme_label(q: dict) -> str:
    """A weight's scheme, with "+act" where its layer's input is quantized to the same format."""
    return q["scheme"] + ("+act" if q.get("activations") else "")


def _quant_summary(manifest: dict, per_layer: bool) -> str:
    quantized = manifest.get("quantized", {})
    if not quantized:
        return ""
    lines = ["", "quantization:"]
    by: dict[str, list[int]] = {}
    for name, q in quantized.items():
        b = by.setdefault(_scheme_label(q), [0, 0])
        b[0] += 1
        b[1] += q["bytes"]
    for scheme, (n, b) in sorted(by.items()):
        lines.append(f"  {scheme:<8} {n:>5} weights {b / 2**20:>10.1f} MiB")
    kept = manifest["meta"].get("quantization", {}).get("kept_float", [])
    if kept:
        lines.append(f"  kept float (group size does not divide): {', '.join(kept)}")
    if per_layer:
        for name, q in sorted(quantized.items()):
            lines.append(f"  {name:<60} {_scheme_label(q):<8} g{q['group_size']:<4} {q['bytes'] / 2**20:8.2f} MiB "
                         f"err {q['rel_error']:.4f}")
    return "\n".join(lines)


from .bench import bench_cmd  # noqa: E402 - `vlmc bench` lives with the benchmark code

main.add_command(bench_cmd)


@main.command("serve")
@click.argument("models", nargs=-1)
@click.option("--model", "model_opt", default=None, help="Model to preload (same as the first MODEL).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--lazy", is_flag=True, help="Load the model on the first request instead of at start.")
@click.option("--api-key", default=None, envvar="VLMC_API_KEY", help="Require 'Authorization: Bearer KEY' (env VLMC_API_KEY).")
@click.option("--cors-origin", "cors", multiple=True, help="Allow browser requests from this origin (repeatable).")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests that may wait (fetching images, being prepared, or for a batch slot); more get 429.")
@click.option("--prefill-chunk", default=512, show_default=True, type=click.IntRange(min=1),
              help="Prompt tokens per prefill step, over all prompts prefilled together (a decode step of the "
                   "running batch comes between steps): larger gives new requests a shorter TTFT, smaller keeps "
                   "running requests' token latency steadier.")
@click.option("--prefill-batch-tokens", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Waiting prompts are prefilled together up to this many (padded) tokens.")
@click.option("--max-tokens", "default_max_tokens", default=512, show_default=True, type=click.IntRange(min=1),
              help="Reply length when a request gives none.")
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(min=1), help="Default: the model's context.")
@click.option("--max-body-bytes", default=32 * 2**20, show_default=True, type=click.IntRange(min=1024))
@click.option("--max-images", default=8, show_default=True, type=click.IntRange(min=0))
@click.option("--max-image-bytes", default=20 * 2**20, show_default=True, type=click.IntRange(min=1))
@click.option("--max-image-pixels", default=40_000_000, show_default=True, type=click.IntRange(min=1))
@click.option("--max-request-pixels", default=80_000_000, show_default=True, type=click.IntRange(min=1),
              help="Pixels of all of a request's images together (bounds the memory one request takes).")
@click.option("--fetch-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to fetch an image URL, redirects included.")
@click.option("--allow-private-fetch", is_flag=True,
              help="Let image URLs reach loopback, private and link-local addresses (refused by default; "
                   "cloud metadata addresses stay refused).")
@click.option("--allow-fetch-network", multiple=True, metavar="CIDR",
              help="Let image URLs reach this network even if private, e.g. 10.0.5.0/24 (repeatable).")
@click.option("--allowed-local-media-path", default=None, help="Folder whose images and videos requests may name "
                                                                  "by path.")
@click.option("--max-videos", default=2, show_default=True, type=click.IntRange(min=0), help="Videos per request.")
@click.option("--max-video-bytes", default=64 * 2**20, show_default=True, type=click.IntRange(min=1))
@click.option("--max-video-frames", default=256, show_default=True, type=click.IntRange(min=1),
              help="Frames sampled from one video (more is a 400: ask for a lower fps or max_frames).")
@click.option("--max-video-duration", default=1800.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds of one video.")
@click.option("--read-timeout", default=15.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a client may take to send a request's headers, and may stay silent while sending "
                   "its body.")
@click.option("--keep-alive-timeout", default=5, show_default=True, type=click.IntRange(min=1),
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--vision-cache-bytes", default=512 * 2**20, show_default=True, type=click.IntRange(min=0))
@click.option("--prefix-cache-bytes", default=2**30, show_default=True, type=click.IntRange(min=0),
              help="KV blocks of earlier prompts kept for reuse (0 turns prefix caching off).")
@click.option("--prefix-block-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Tokens per prefix-cache block.")
@click.option("--prefix-cache-dir", default=None,
              help="Disk tier: blocks evicted from memory (and all of them at shutdown) are kept here.")
@click.option("--prefix-cache-disk-bytes", default=10 * 2**30, show_default=True, type=click.IntRange(min=0))
@click.option("--prefix-state-every", default=0, show_default=True, type=click.IntRange(min=0),
              help="Models with recurrent layers (linear attention): also keep their states every this many "
                   "blocks of a prompt, not only at its end and where it leaves a cached prefix (0).")
@click.option("--top-logprobs-k", default=5, show_default=True, type=click.IntRange(0, 20))
@click.option("--enable-thinking/--disable-thinking", default=None, help="Default for requests that do not say.")
@click.option("--thinking-budget", default=None, type=click.IntRange(min=1))
@click.option("--thinking-start-token", default="<think>", show_default=True)
@click.option("--thinking-end-token", default="</think>", show_default=True)
@click.option("--dtype", type=DTYPE, default="float32", show_default=True,
              help="Weight dtype when a MODEL must be compiled first.")
@click.option("--generation-config", type=click.Choice(["auto", "vlmc"]), default="auto", show_default=True,
              help="auto: sampling fields a request leaves unset take the checkpoint's generation_config.json "
                   "defaults (else temperature 1); vlmc: ignore them.")
@click.option("--prompt-lookup", is_flag=True, help="Speculate with prompt lookup (lossless; see vlmc run).")
@click.option("--draft-model", default=None, help="Speculate with this draft model (same tokenizer).")
@click.option("--num-draft-tokens", default=4, show_default=True, type=click.IntRange(1, 15),
              help="Most tokens drafted per sequence and step.")
@kv_flags
@exit_on_user_error
def serve_cmd(models: tuple[str, ...], model_opt: str | None, **kw) -> None:
    """OpenAI-compatible HTTP server. MODELS: artifacts, checkpoint folders or hub ids; the
    first is served (preloaded unless --lazy), the others are swapped in when a request
    names them. Without MODELS, the bundled demo model."""
    from .serve.server import serve
    sources = ([model_opt] if model_opt else []) + [m for m in models if m != model_opt]
    prompt_lookup, draft_model = kw.pop("prompt_lookup"), kw.pop("draft_model")
    if prompt_lookup and draft_model:
        raise VlmcError("give either --draft-model or --prompt-lookup, not both")
    draft = draft_model or ("prompt-lookup" if prompt_lookup else None)
    serve(sources or [_default_model()], kv=pop_kv(kw), draft=draft, **kw)


if __name__ == "__main__":  # pragma: no cover  (last: after every command is defined)
    main()
