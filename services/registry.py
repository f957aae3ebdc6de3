"""Each service's ``main``, by name: what `miles serve SERVICE` runs.

Plain imports (inside the function, so a process loads only its own service and its
dependencies) rather than ``importlib`` on a string, so the import contracts see them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from miles.runtime.service import ServiceContext

ServiceMain = Callable[[ServiceContext], Awaitable[None]]


def service_main(name: str) -> ServiceMain:
    if name == "coordinator":
        from services.coordinator.main import main
    elif name == "rollout":
        from services.rollout.main import main
    elif name == "reward":
        from services.reward.main import main
    elif name == "buffer":
        from services.buffer.main import main
    elif name == "trainer":
        from services.trainer.main import main
    else:
        raise ValueError(f"no service {name!r}")
    return main
