"""The compiled train step kept on disk: a run of the same code, config and shapes loads it without
tracing; any other compiles afresh; a damaged file is replaced."""

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import compiled_step

OUT_TREE = jax.tree.structure(({"w": 0}, {"loss": 0}))


def counted_step():
    """A jitted step, donating its state as the train step does, and the list of its traces."""
    traces = []

    def step(state, batch):
        traces.append(batch["x"].shape)
        return {"w": state["w"] - 0.1 * batch["x"].mean(0)}, {"loss": jnp.square(batch["x"]).mean()}

    return jax.jit(step, donate_argnums=0), traces


def arguments(examples=4):
    return {"w": jnp.ones(3)}, {"x": jnp.arange(examples * 3.0).reshape(examples, 3)}


def load_or_compile(directory, config="{}", examples=4):
    jitted, traces = counted_step()
    step, loaded = compiled_step.load_or_compile(jitted, arguments(examples), OUT_TREE, str(directory), config)
    return step, loaded, traces


def test_a_second_run_loads_the_step_without_tracing_and_computes_the_same(tmp_path):
    first, loaded, traces = load_or_compile(tmp_path)
    assert not loaded and len(traces) == 1
    [name] = os.listdir(tmp_path)
    assert name.endswith(".process0")
    second, loaded, traces = load_or_compile(tmp_path)
    assert loaded and traces == []
    for a, b in zip(jax.tree.leaves(first(*arguments())), jax.tree.leaves(second(*arguments()))):
        np.testing.assert_array_equal(a, b)
    state, batch = arguments()
    new_state, _ = second(state, batch)
    np.testing.assert_allclose(new_state["w"], 1 - 0.1 * np.array([4.5, 5.5, 6.5]))
    assert state["w"].is_deleted()  # the loaded step still donates the state, as the jitted one


def test_another_config_or_shape_compiles_afresh_and_replaces_the_step(tmp_path):
    load_or_compile(tmp_path)
    for config, examples in (('{"lr": 1}', 4), ("{}", 8)):
        _, loaded, traces = load_or_compile(tmp_path, config, examples)
        assert not loaded and traces == [(examples, 3)]
        assert len(os.listdir(tmp_path)) == 1  # the step of the earlier key is gone
    assert load_or_compile(tmp_path, "{}", 8)[1]


def test_the_key_follows_the_source_of_every_module_of_ours(tmp_path, monkeypatch):
    module = tmp_path / "user_model.py"
    module.write_text("WIDTH = 16\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "user_model", importlib.import_module("user_model"))
    before = compiled_step.key(arguments(), "{}")
    assert compiled_step.key(arguments(), "{}") == before
    module.write_text("WIDTH = 32\n")
    assert compiled_step.key(arguments(), "{}") != before


def test_installed_packages_are_known_by_their_records_not_read():
    sources = compiled_step._own_sources()
    assert jax.__file__ not in sources and np.__file__ not in sources
    assert compiled_step.__file__ in sources
    names = [name for name, _ in compiled_step._installed_packages()]
    assert any(name.startswith(f"jax-{jax.__version__}.") for name in names)


def test_the_key_follows_a_reinstalled_package(tmp_path, monkeypatch):
    record = tmp_path / "somepackage-1.0.dist-info" / "RECORD"
    record.parent.mkdir()
    record.write_text("somepackage/__init__.py,sha256=abc,10\n")
    monkeypatch.setattr(compiled_step, "_installed_directories", lambda: [str(tmp_path)])
    before = compiled_step.key(arguments(), "{}")
    record.write_text("somepackage/__init__.py,sha256=def,10\n")  # the same version, other files
    assert compiled_step.key(arguments(), "{}") != before


def test_the_key_follows_the_xla_flags_and_jax_settings(monkeypatch):
    before = compiled_step.key(arguments(), "{}")
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
    assert compiled_step.key(arguments(), "{}") != before
    monkeypatch.undo()
    assert compiled_step.key(arguments(), "{}") == before
    precision = jax.config.values["jax_default_matmul_precision"]
    try:
        jax.config.update("jax_default_matmul_precision", "bfloat16")
        assert compiled_step.key(arguments(), "{}") != before
    finally:
        jax.config.update("jax_default_matmul_precision", precision)


def test_a_damaged_step_is_compiled_afresh_and_replaced(tmp_path):
    load_or_compile(tmp_path)
    [name] = os.listdir(tmp_path)
    size = (tmp_path / name).stat().st_size
    (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[: size // 2])
    _, loaded, traces = load_or_compile(tmp_path)
    assert not loaded and len(traces) == 1
    assert (tmp_path / name).stat().st_size == size
    assert load_or_compile(tmp_path)[1]


def test_outputs_other_than_the_given_tree_are_refused(tmp_path):
    jitted, _ = counted_step()
    with pytest.raises(ValueError, match="the step's outputs are"):
        compiled_step.load_or_compile(jitted, arguments(), jax.tree.structure(({"w": 0}, {})),
                                      str(tmp_path), "{}")
    assert os.listdir(tmp_path) == []  # nothing written


def test_steps_of_other_keys_and_half_written_files_of_this_process_are_removed(tmp_path):
    leftovers = ["old.process0", "old.process0.x1y2.partial", "old.process1", "old.process10",
                 "old.process1.x1y2.partial"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"")
    load_or_compile(tmp_path)
    kept = sorted(os.listdir(tmp_path))
    [new] = [n for n in kept if n not in leftovers]
    assert new.endswith(".process0")
    assert [n for n in kept if n in leftovers] == ["old.process1", "old.process1.x1y2.partial", "old.process10"]


SCRIPT = """
import jax, jax.numpy as jnp, sys
from resnet_jax import compiled_step
step = jax.jit(lambda s, b: ({"w": s["w"] * b["x"].sum()}, {"loss": b["x"].mean()}))
args = ({"w": jnp.ones(3)}, {"x": jnp.ones((4, 3))})
compiled, loaded = compiled_step.load_or_compile(
    step, args, jax.tree.structure(({"w": 0}, {"loss": 0})), sys.argv[1], "{}")
print(loaded, float(compiled(*args)[0]["w"][0]))
"""


def test_a_new_process_with_the_same_code_loads_the_step(tmp_path):
    runs = [subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    assert [r.stdout.split() for r in runs] == [["False", "12.0"], ["True", "12.0"]], runs[-1].stderr[-2000:]


def test_a_directory_that_cannot_be_written_leaves_the_run_going(tmp_path):
    (tmp_path / "file").write_text("")
    step, loaded, traces = load_or_compile(tmp_path / "file" / "steps")
    assert not loaded and len(traces) == 1
    np.testing.assert_allclose(step(*arguments())[1]["loss"], np.mean(np.arange(12.0) ** 2))


def test_a_kept_step_that_takes_other_arguments_is_compiled_afresh(tmp_path):
    load_or_compile(tmp_path)  # compiled for 4 examples
    [name] = os.listdir(tmp_path)
    os.rename(tmp_path / name, tmp_path / f"{compiled_step.key(arguments(8), '{}')}.process0")
    _, loaded, traces = load_or_compile(tmp_path, "{}", 8)
    assert not loaded and traces == [(8, 3)]
