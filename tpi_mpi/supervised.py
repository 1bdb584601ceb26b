"""The engine's side of `serve --ranks`: launched by the supervisor with `serve --channel PATH`,
rank 0 takes its requests from the supervisor's channel instead of HTTP and, when the engine fails,
reports why there before the job ends (the supervisor's side is supervisor.py)."""

from __future__ import annotations

from .launcher import launch_rank
from .options import run_config


def serve_for_supervisor(cfg, channel_path: str, kw: dict) -> None:
    """Rank 0 answers the supervisor over its channel; a failure is reported there before the job ends."""
    from .startup import Session
    from .steps import run_steps

    channel = None
    if launch_rank() == 0:
        from .channel import Channel, failure_message
        from .serve import serve_channel

        channel = Channel.connect(channel_path)
    try:
        with Session(run_config(kw, cfg.max_batch)) as s:
            run_steps(s, lambda root: serve_channel(root, cfg, channel))
    except BaseException as e:
        if channel is not None:
            channel.send({"failed": failure_message(e)})
        raise
