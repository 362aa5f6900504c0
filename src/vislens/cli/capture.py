"""`vislens capture`: image-token activations per layer, exported for probes and SAEs."""

from __future__ import annotations

from pathlib import Path

import typer

from vislens.cli.common import console, emit, positive, progress_for
from vislens.cli.image_inputs import DATA_HELP, DEFAULT_DATA, meta, names
from vislens.cli.model_options import ModelOptions, model_options, model_session


@model_options
def capture(
    opts: ModelOptions,
    data: str = typer.Option(DEFAULT_DATA, help=DATA_HELP),
    n: int = typer.Option(100, "--n", help="number of images"),
    out: Path = typer.Option(Path("runs/capture"), help="export directory (rerun to resume)"),
    layers: str = typer.Option("all", help="layers: all, or a list like 0,2,4-6; residual L "
                               "is the input of decoder layer L (the number of layers: the "
                               "last one's output), keys / values L those of decoder layer L"),
    sources: str = typer.Option("residual", help="comma list of residual, keys (post-RoPE), "
                                "keys-pre and values"),
    text: bool = typer.Option(False, "--text", help="also the prompt's other tokens (chat "
                              "template, text, image newline / marker tokens)"),
    shard_size: int = typer.Option(32, help="images per shard file: memory holds one "
                                   "shard's tensors"),
    prompt: str = typer.Option("describe this image .", help="the text after the image"),
    batch_size: int = typer.Option(4, help="images per forward pass"),
) -> None:
    """Export activations of every image token per layer: sharded safetensors (the model's
    dtype) plus a parquet index of sample, tile, row, col, pixel box and the object under
    each token, for training probes and sparse autoencoders.

    Read back with vislens.data.activations: load_activations(OUT, layer=L, source=S) gives
    a tensor and its index table, ActivationDataset streams rows; the format is in
    docs/activations.md.

    Example: vislens capture --model toy --n 200 --sources residual,keys,values --out acts
    """
    with model_session(opts) as load:
        positive("--n", n)
        from vislens.data import open_dataset
        from vislens.experiments import capture as cap

        config = cap.CaptureConfig(layers=cap.parse_layers(layers), sources=names(sources),
                                   text=text, shard_size=shard_size, batch_size=batch_size,
                                   prompt=prompt)
        config.validate()
        samples = open_dataset(data, n=n)
        if not samples:
            raise ValueError(f"{data} holds no images; check the path or --n")
        vlm = load()
        summary = cap.execute(vlm, samples, config, out, meta(opts, data, n),
                              progress=progress_for(opts.as_json))
        if opts.as_json:
            emit(summary, True)
            return
        tokens = ", ".join(f"{v} {k}" for k, v in summary["n_tokens"].items())
        console.print(
            f"{summary['n_images']} images ({tokens} tokens; {summary['n_object_tokens']} "
            f"image tokens on an object) x {len(summary['layers'])} layers x "
            f"{', '.join(summary['sources'])} in {summary['dtype']}: {summary['n_shards']} "
            f"shards, {summary['bytes'] / 2**20:.1f} MiB in {summary['out']}", highlight=False)
        console.print(f"load: {summary['load']}", highlight=False)
