"""The ``sidenet serve`` and ``sidenet classify`` commands (registered into :mod:`sidenet.cli`'s app).

``serve`` starts a local Ray Serve application (or deploys one on the Ray cluster at ``--address``);
``classify`` labels a folder of images or a parquet file into a parquet file, in this process or, with
``--ray``, with an actor pool of Ray Data. Both check their arguments before Ray or a MainNet is loaded;
Ray itself is imported only when used (it is the optional ``serve`` extra).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from sidenet.cli_options import ChannelsLastOption, CompileOption, DtypeOption, check_compile_backend, fail

SidenetOption = Annotated[
    Path, typer.Option("--sidenet", help="Folder of a saved SideNet (sidenet fit's output).", show_default=False)
]
TaskOption = Annotated[str | None, typer.Option(help="Built-in task of the MainNet (default: the SideNet's).")]
MainnetOption = Annotated[
    str | None,
    typer.Option(help="An image MainNet built by a function, MODULE:FUNCTION or FILE.py:FUNCTION (not with --task)."),
]
WeightsOption = Annotated[Path | None, typer.Option(help="The --mainnet's weights: a safetensors state dict.")]
ThresholdOption = Annotated[float | None, typer.Option(help="Override the saved threshold.")]
ModeOption = Annotated[str, typer.Option(help="adaptive (per-sample routing) or main (the MainNet alone).")]


def _source(
    sidenet: Path, task: str | None, mainnet: str | None, threshold: float | None, weights: Path | None = None
) -> Any:
    """The checked :class:`SidenetSource` (loads no MainNet)."""
    from sidenet.integrations.inputs import SidenetSource
    from sidenet.tasks import TASKS

    if not (sidenet / "sidenet_config.json").is_file():
        fail(f"no saved SideNet in {sidenet} (no sidenet_config.json): run `sidenet fit` first")
    if task is not None and mainnet is not None:
        fail("give --task or --mainnet, not both")
    if task is not None and task not in TASKS:
        fail(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if mainnet is not None and ":" not in mainnet:
        fail(f"--mainnet names a function as MODULE:FUNCTION or FILE.py:FUNCTION, got {mainnet!r}")
    if weights is not None and (mainnet is None or not weights.is_file()):
        fail(f"--mainnet-weights needs --mainnet and an existing safetensors file, got {weights}")
    if threshold is not None and not 0 <= threshold <= 1:
        fail(f"--threshold must lie in [0, 1], got {threshold}")
    return SidenetSource(str(sidenet), task, mainnet, threshold, None if weights is None else str(weights))


def _ray_or_fail() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401 - checks the serve extra too
    except ImportError:
        fail("this needs Ray: pip install 'sidenet[serve]'")
    return ray


def _curl_line(inputs: Any, url: str) -> str:
    if inputs.kind == "text":
        return f"curl -X POST -H 'Content-Type: application/json' -d '{{\"text\": \"a gorgeous film\"}}' {url}"
    return f"curl -X POST -H 'Content-Type: image/png' --data-binary @image.png {url}"


def serve_command(
    sidenet: Annotated[
        Path | None, typer.Option("--sidenet", help="Folder of a saved SideNet (sidenet fit's output).")
    ] = None,
    task: TaskOption = None,
    mainnet: MainnetOption = None,
    mainnet_weights: WeightsOption = None,
    threshold: ThresholdOption = None,
    host: Annotated[str, typer.Option(help="Address the HTTP proxy listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    replicas: Annotated[int, typer.Option(help="Replicas of the deployment.")] = 1,
    cpus: Annotated[float, typer.Option(help="CPUs per replica.")] = 1.0,
    gpus: Annotated[float, typer.Option(help="GPUs per replica.")] = 0.0,
    max_batch_size: Annotated[int, typer.Option(help="Most requests per batch.")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a batch waits to fill.")] = 5.0,
    max_wait: Annotated[int, typer.Option(help="Most later batches a continuing sample waits for.")] = 4,
    flush_ms: Annotated[float, typer.Option(help="Finish waiting samples after this long without a batch.")] = 20.0,
    audit_share: Annotated[float, typer.Option(help="Share of samples audited against the MainNet.")] = 0.01,
    mode: ModeOption = "adaptive",
    compile_backend: CompileOption = None,
    dtype: DtypeOption = None,
    channels_last: ChannelsLastOption = None,
    address: Annotated[str | None, typer.Option(help="A running Ray cluster (default: start one here).")] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="A Serve config file (YAML) of sidenet apps, instead of the flags above."),
    ] = None,
    seconds: Annotated[float | None, typer.Option(help="Stop after this long (default: until Ctrl-C).")] = None,
) -> None:
    """Serve a SideNet + MainNet over HTTP with Ray Serve: POST one image or sentence, get its label."""
    if min(replicas, max_batch_size) < 1 or min(cpus, gpus, batch_wait_ms, flush_ms) < 0:
        fail("--replicas and --max-batch-size must be >= 1; --cpus, --gpus and the waits >= 0")
    if (config is None) == (sidenet is None):
        fail("give --sidenet FOLDER (and the flags) or --config FILE")
    if config is not None and not config.is_file():
        fail(f"no config file {config}")
    if config is None:  # a config file names its own
        _check_port(host, port)
    source = None if sidenet is None else _source(sidenet, task, mainnet, threshold, mainnet_weights)
    if channels_last and (source is None or source.inputs().kind == "text"):
        fail("--channels-last lays out an image MainNet's convolutions: give it with --sidenet of an image model")
    from sidenet.host_memory import switched_on
    from sidenet.integrations.options import ServeOptions

    try:
        options = ServeOptions(
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_ms / 1000,
            mode=mode,
            max_wait=max_wait,
            flush_after_s=flush_ms / 1000,
            audit_share=audit_share,
            device="cuda" if gpus > 0 else None,
            dtype=dtype,
            channels_last=channels_last,
            compile_backend=compile_backend,
            retain_cpu_memory=switched_on(),  # in the replicas too: SIDENET_CPU_MEMORY=system turns it off
        )
    except ValueError as exc:
        fail(str(exc))
    ray = _ray_or_fail()
    from ray import serve

    from sidenet.integrations.ray_serve import app_builder, build_app

    if config is not None:
        import yaml

        spec = yaml.safe_load(config.read_text()) or {}
        apps = spec.get("applications") or []
        if not apps or any(not a.get("import_path", "").endswith("ray_serve:app_builder") for a in apps):
            fail("the config needs applications with import_path: sidenet.integrations.ray_serve:app_builder")
        http = spec.get("http_options") or {}
        host, port = http.get("host", host), int(http.get("port", port))
        try:
            built = [
                (a.get("name", f"sidenet{i}"), a.get("route_prefix", "/"), app_builder(a.get("args") or {}))
                for i, a in enumerate(apps)
            ]
        except (ValueError, TypeError) as exc:
            fail(f"{config}: {exc}")
        inputs = None
    else:
        inputs = source.inputs()
        app = build_app(source, inputs, options, num_replicas=replicas, num_cpus=cpus, num_gpus=gpus)
        built = [("sidenet", "/", app)]
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": host, "port": port})
        for name, prefix, app in built:
            serve.run(app, name=name, route_prefix=prefix)
    except RuntimeError as exc:  # a replica that failed to start: Serve's message says which and why
        serve.shutdown()
        ray.shutdown()
        fail(f"{exc} (replica logs: /tmp/ray/session_latest/logs/serve/)")
    url = f"http://{host}:{port}/"
    typer.echo(f"Serving on {url} (GET {url}health, {url}metrics). Try:")
    if inputs is not None:
        typer.echo("  " + _curl_line(inputs, url))
    try:
        deadline = None if seconds is None else time.monotonic() + seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def classify_command(
    input: Annotated[Path, typer.Option("--input", help="A folder of images or a parquet file.")],
    output: Annotated[Path, typer.Option("--output", help="The parquet file to write.")],
    sidenet: SidenetOption,
    task: TaskOption = None,
    mainnet: MainnetOption = None,
    mainnet_weights: WeightsOption = None,
    threshold: ThresholdOption = None,
    column: Annotated[str | None, typer.Option(help="Input column of a parquet file (default image or text).")] = None,
    use_ray: Annotated[bool, typer.Option("--ray", help="Classify with Ray Data (an actor pool).")] = False,
    concurrency: Annotated[int, typer.Option(help="With --ray: actors, each with its own model.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Rows per batch handed to a model's router.")] = 1024,
    model_batch: Annotated[int, typer.Option(help="Samples per model batch.")] = 64,
    mode: ModeOption = "adaptive",
    compile_backend: CompileOption = None,
    device: Annotated[
        str | None,
        typer.Option(help="Where the model runs (cpu, cuda, cuda:1; default: cuda with --gpus, else the CPU)."),
    ] = None,
    dtype: DtypeOption = None,
    channels_last: ChannelsLastOption = None,
    gpus: Annotated[float, typer.Option(help="With --ray: GPUs per actor.")] = 0.0,
    address: Annotated[str | None, typer.Option(help="With --ray: a running Ray cluster.")] = None,
) -> None:
    """Label a folder of images or a parquet file into a parquet file (label, class_name, confidence,
    exited, flops, error); with --ray on an actor pool of Ray Data."""
    from sidenet.integrations.ray_data import classify_file

    if not input.exists():
        fail(f"no input {input}")
    if output.suffix.lower() != ".parquet":
        fail(f"--output must be a .parquet file, got {output}")
    if output.resolve() == input.resolve():
        fail(f"--output {output} is the input file: the answers would replace the inputs; write them elsewhere")
    if min(concurrency, batch_size, model_batch) < 1 or gpus < 0:
        fail("--concurrency, --batch-size and --model-batch must be >= 1, --gpus >= 0")
    if gpus > 0 and not use_ray:
        fail("--gpus places Ray actors: give --ray, or --device cuda to classify on a GPU here")
    from sidenet.integrations.options import check_placement

    device = device or ("cuda" if gpus > 0 else None)
    try:
        check_placement(device, dtype)
    except ValueError as exc:
        fail(str(exc))
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"
    if use_ray and cuda and gpus == 0:
        fail(f"--device {device} with --ray: give each actor a GPU with --gpus (Ray places them)")
    if not use_ray and cuda and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device on this machine")
    if mode not in ("adaptive", "main"):
        fail(f"--mode must be adaptive or main, got {mode!r}")
    try:
        check_compile_backend(compile_backend)
    except ValueError as exc:
        fail(str(exc))
    source = _source(sidenet, task, mainnet, threshold, mainnet_weights)
    if channels_last and source.inputs().kind == "text":
        fail("--channels-last lays out an image MainNet's convolutions: this SideNet's MainNet reads text")
    from sidenet.host_memory import switched_on

    options: dict[str, Any] = {
        "model_batch": model_batch,
        "mode": mode,
        "compile_backend": compile_backend,
        "device": device,
        "dtype": dtype,
        "channels_last": channels_last,
        "retain_cpu_memory": switched_on(),  # in the Ray Data actors too: SIDENET_CPU_MEMORY=system turns it off
    }
    started = time.perf_counter()
    ours = False  # shut down only a Ray this command started (not the caller's)
    if use_ray:
        ray = _ray_or_fail()
        ours = not ray.is_initialized()
        if ours:
            ray.init(address=address, include_dashboard=False)
        options["concurrency"] = concurrency
        options["num_gpus"] = gpus
    try:
        rows = classify_file(input, output, source, column=column, use_ray=use_ray, batch_size=batch_size, **options)
    except (ValueError, KeyError) as exc:
        fail(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
    finally:
        if ours:
            ray.shutdown()
    seconds = time.perf_counter() - started
    failed, first = _failed_rows(output)
    if rows and failed == rows:
        fail(f"no row of {input} could be classified ({rows} rows; the first error: {first}); see {output}'s errors")
    summary = f"; {failed} failed (the first: {first}; see the error column)" if failed else ""
    typer.echo(f"Classified {rows} rows into {output} in {seconds:.1f} s{summary}")


def _failed_rows(output: Path) -> tuple[int, str | None]:
    """How many rows of a written answers file carry an error, and the first of those errors."""
    import pyarrow.parquet as pq

    failed = [error for error in pq.read_table(output, columns=["error"]).column("error").to_pylist() if error]
    return len(failed), (failed[0] if failed else None)


def _check_port(host: str, port: int) -> None:
    """Refuse a port out of range, or one that ``host`` cannot listen on (another server there), before Ray
    starts: Ray's own failure is dozens of lines of an actor's traceback."""
    import socket

    if not 0 < port < 65536:
        fail(f"--port must lie in 1-65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        fail(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); is another server on it?")


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``classify`` to the ``sidenet`` app."""
    app.command("serve")(serve_command)
    # Its docstring's first lines wrap badly in the command list: a one-line summary there.
    short = "Label a folder of images or a parquet file into a parquet file; with --ray on Ray Data."
    app.command("classify", short_help=short)(classify_command)
