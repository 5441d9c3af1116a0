"""Which workdirs count as a finished run of a config (finished.final_step); the final
checkpoint is verified on the host, nothing compiled. (A corrupt one: test_robust.)"""

import ml_collections
import numpy as np
from etils import epath

from resnet_jax.run import checkpoint
from resnet_jax.training import finished

CONFIG = ml_collections.ConfigDict(dict(train=dict(num_steps=20), checkpoint=dict(
    every_steps=10, keep=3, keep_best=False, timeout_seconds=1200)))


def _run(workdir, final_step, final=True):
    (workdir / "config.json").write_text(CONFIG.to_json_best_effort(indent=2))
    manager = checkpoint.create_manager(epath.Path(workdir), CONFIG.checkpoint)
    for step in range(10, final_step + 1, 10):
        checkpoint.save(manager, step, {"w": np.full(3, step, np.float32)}, force=True,
                        final=final and step == final_step)
    checkpoint.wait(manager)
    manager.close()


def test_a_run_whose_last_checkpoint_is_its_final_step_is_finished(tmp_path):
    _run(tmp_path, 20)
    assert finished.final_step(CONFIG, str(tmp_path)) == 20


def test_a_preempted_run_is_not_finished(tmp_path):
    _run(tmp_path, 20, final=False)
    assert finished.final_step(CONFIG, str(tmp_path)) is None


def test_another_config_on_a_finished_run_is_not_finished(tmp_path):
    _run(tmp_path, 20)
    longer = ml_collections.ConfigDict(CONFIG.to_dict())
    longer.train.num_steps = 30
    assert finished.final_step(longer, str(tmp_path)) is None


def test_a_final_checkpoint_without_its_metadata_is_not_finished(tmp_path):
    # The resume then names it corrupt and restores step 10 (test_robust).
    _run(tmp_path, 20)
    (tmp_path / "checkpoints" / "20" / "default" / "_METADATA").unlink()
    assert finished.final_step(CONFIG, str(tmp_path)) is None


def test_an_empty_or_missing_workdir_is_not_finished(tmp_path):
    assert finished.final_step(CONFIG, str(tmp_path)) is None
    assert finished.final_step(CONFIG, str(tmp_path / "absent")) is None
