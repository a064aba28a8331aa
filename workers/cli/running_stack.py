"""How a command finds the servers it talks to: the environment's addresses, or those of a running `rtrec up`.

`connected_settings` is for commands that need a broker and Redis (and says how to get them when there
are none); `stack_or_none` is for the commands that manage the `rtrec up` of this run dir itself.
"""

from __future__ import annotations

from rtrec.stream.settings import Settings, get_settings
from rtrec.workers.cli.errors import UserError, context


def connected_settings() -> Settings:
    """Settings with server addresses from the environment or a running `rtrec up`."""
    from rtrec.stream.connections import NotConfigured
    from rtrec.workers.stack import adopt_running_stack

    env = get_settings()
    settings = adopt_running_stack(env)
    if (settings.kafka_bootstrap, settings.redis_url) != (env.kafka_bootstrap, env.redis_url):
        context["stack_file"] = f"{settings.run_dir}/stack.json"  # a connection error then hints at a stale file
    if not settings.kafka_bootstrap or not settings.redis_url:
        raise UserError(
            str(
                NotConfigured(
                    "no running stack found: start it with `rtrec up` or set RTREC_KAFKA_BOOTSTRAP and RTREC_REDIS_URL"
                )
            )
        )
    return settings


def stack_or_none() -> tuple[Settings, dict | None]:
    """This run dir's settings, and the stack.json of the `rtrec up` running there (None when none runs)."""
    from rtrec.workers.stack import locate, running_stack

    settings = locate(get_settings())
    return settings, running_stack(settings.run_dir)
