"""The ``vlmc`` command: compile, run, inspect.

User mistakes (bad paths, unsupported models, broken images, over-long prompts) print
one ``error:`` line and exit 1; only bugs in vlmc show a traceback.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import VlmcError


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VlmcError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vlmc")
def main() -> None:
    """vlmc: compile vision-language models to MLX artifacts and run them."""


DTYPE = click.Choice(["float32", "bfloat16", "float16"])
TARGET = click.Choice(["cpu", "metal", "cuda"])


@main.command("compile")
@click.argument("src")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Artifact folder to write (default: the compile cache).")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True, help="Weight storage dtype.")
@click.option("--target", type=TARGET, default=None, help="Target backend (default: this machine's).")
@click.option("--passes", "preset", default="default", show_default=True, help="Pass preset: default or none.")
@_user_errors
def compile_cmd(src: str, out: Path | None, dtype: str, target: str | None, preset: str) -> None:
    """Compile SRC (a checkpoint folder or Hugging Face hub id) into an MLX artifact."""
    from .compiler import compile as compile_checkpoint
    path = compile_checkpoint(src, out, dtype=dtype, target=target, preset=preset, progress=True)
    click.echo(str(path))


@main.command("run")
@click.argument("src")
@click.option("-p", "--prompt", required=True, help="The user message.")
@click.option("-i", "--image", "images", multiple=True, help="Image path, http(s) URL or data: URI (repeatable).")
@click.option("--system", default=None, help="System message.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--min-p", default=0.0, show_default=True, type=float)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--stop", "stops", multiple=True, help="Stop string (repeatable).")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True,
              help="Weight dtype when SRC must be compiled first.")
@click.option("-v", "--verbose", is_flag=True, help="Print token counts, speeds and peak memory.")
@_user_errors
def run_cmd(src: str, prompt: str, images: tuple[str, ...], system: str | None, max_tokens: int,
            temperature: float, top_p: float, top_k: int, min_p: float, repetition_penalty: float,
            seed: int | None, stops: tuple[str, ...], dtype: str, verbose: bool) -> None:
    """Generate a reply from SRC (an artifact, a checkpoint folder or a hub id; checkpoints
    are compiled once and cached)."""
    from .api import load
    from .runtime.sampling import SamplingParams
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    model = load(src, dtype=dtype, progress=True)
    last = None
    for chunk in model.stream_generate(prompt, images=list(images), system=system, max_tokens=max_tokens,
                                       stop=list(stops), sampling=params):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if verbose and last is not None:
        s = last.stats
        click.echo(f"prompt: {s['prompt_tokens']} tokens, {s['prompt_tps']:.1f} tok/s | generation: "
                   f"{s['generation_tokens']} tokens, {s['generation_tps']:.1f} tok/s | peak memory "
                   f"{s['peak_memory_gb']:.3f} GB | finish: {last.finish_reason}", err=True)


@main.command("inspect")
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (artifacts) as JSON.")
@_user_errors
def inspect_cmd(src: str, as_json: bool) -> None:
    """Print the IR, parameter counts and memory of an artifact or a checkpoint."""
    from .runtime.artifact import is_artifact, read_manifest, reject_unfinished
    if is_artifact(src):
        manifest = read_manifest(Path(src))
        if as_json:
            click.echo(json.dumps(manifest, indent=1))
            return
        click.echo((Path(src) / "program.ir").read_text())
        click.echo(_memory_summary(manifest["tensors"]))
        return
    reject_unfinished(src)
    from .frontend import import_checkpoint, open_checkpoint
    from .ir.printer import format_program
    from .passes import PRESETS, run_passes
    prog = run_passes(import_checkpoint(open_checkpoint(src)), PRESETS["default"])
    click.echo(format_program(prog))


def _memory_summary(tensors: dict) -> str:
    from .ir.core import dtype_size
    groups: dict[str, list[int]] = {}
    for name, t in tensors.items():
        n = 1
        for d in t["shape"]:
            n *= d
        g = groups.setdefault(name.split(".")[0], [0, 0])
        g[0] += n
        g[1] += n * dtype_size(t["dtype"])
    lines = ["", "weights:"]
    for g, (n, b) in sorted(groups.items()):
        lines.append(f"  {g:<10} {n:>14,} params {b / 2**20:>10.1f} MiB")
    total_n = sum(v[0] for v in groups.values())
    total_b = sum(v[1] for v in groups.values())
    lines.append(f"  {'total':<10} {total_n:>14,} params {total_b / 2**20:>10.1f} MiB")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main()
