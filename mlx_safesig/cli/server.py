"""`mlx-safesig server`: the OpenAI-compatible HTTP server (``mlx_safesig.server``)."""

import click

from .base import (
    adapter_option,
    load_model,
    main,
    model_option,
    safety_config,
    safety_options,
    sampling_options,
    say,
    user_errors,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@main.command()
@model_option()
@adapter_option()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but loopback is reachable from the network; "
              "there is no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--decode-concurrency", type=click.IntRange(1), default=32, show_default=True,
              help="Requests decoded together in one batch; more wait in the queue.")
@click.option("--queue-size", type=click.IntRange(1), default=64, show_default=True,
              help="Requests that may wait for a place in the batch; more get 429.")
@sampling_options(max_tokens=512)
@safety_options
@user_errors
def server(model, adapter_path, host, port, decode_concurrency, queue_size, max_tokens, temp,
           top_p, top_k, min_p, seed, **safety):
    """Serve the model over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models,
    /health); every response carries a "safety" object. Sampling options are the defaults of
    requests that leave them out. SIGTERM or Ctrl-C answers the requests in flight, then exits."""
    from ..default_model import DEFAULT_MODEL
    from ..server import Sampling, serve

    config = safety_config(**safety)
    if not config.enabled:
        raise click.ClickException("the server runs with safety on (its responses carry the "
                                   "safety signal); for plain generation run mlx_lm.server on "
                                   "the same model directory.")
    if host not in LOOPBACK:
        say(f"warning: listening on {host}, not loopback: anyone who can reach this machine "
            "can use the model (there is no authentication).")
    sampling = Sampling(max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k,
                        min_p=min_p, seed=seed)
    net, tokenizer = load_model(model, adapter_path=adapter_path)
    try:
        serve(net, tokenizer, config, model_id=model or DEFAULT_MODEL, host=host, port=port,
              sampling=sampling, max_batch=decode_concurrency, max_queue=queue_size,
              on_ready=lambda s: say(f"mlx-safesig server: {s.url}/v1 (model {s.model_id}); "
                                     "SIGTERM or Ctrl-C stops it."))
    except OSError as e:  # the address is taken, or not this machine's
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}.") from None
