"""A finished run: the same command on it says so and exits at once, writing nothing."""

from typing import Any

import jax

from resnet_jax.distributed import sharding
from resnet_jax.run import checkpoint, paths


def final_step(config: Any, workdir: str) -> int | None:
    """The last step of the run in `workdir` where that run has finished with this very config:
    its config.json is `config`'s, and its latest checkpoint was saved as the run's last step and
    is intact (checksums and finite values, verified with numpy: `checkpoint.read`). Else None,
    and the run goes on as any resumed run, which names what is wrong and sets a corrupt
    checkpoint aside. Reads only; the same answer on every process."""
    try:
        path = paths.resolve(workdir)
        saved = path / "config.json"
        found = None
        if saved.exists() and saved.read_text() == config.to_json_best_effort(indent=2):
            manager = checkpoint.reader(path)
            step = manager.latest_step()
            if step is not None and checkpoint.is_final(manager, step):
                device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
                checkpoint.read(manager, step, device)
                found = step
    except Exception:  # unreadable or corrupt: the run's restore says what and moves it aside
        found = None
    return found if sharding.same_on_every_process(str(found)) else None
