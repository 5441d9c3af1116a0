"""A jitted function's compile, timed by phase (trace, lower, backend compile), its steps timed,
and JAX's persistent compilation cache: for the benchmarks that time compiles and steps."""

import os
import time
from typing import Any

import jax


def timed_compile(fn, *args) -> tuple[Any, dict[str, float]]:
    """(compiled, times). compile_cpu_seconds is the process's CPU time (all threads) over all
    phases, which other work on a shared machine disturbs less than the wall clock. XLA's CPU
    backend compiles on more than one thread at times, so it can exceed the wall clock."""
    cpu_began = time.process_time()
    began = time.perf_counter()
    traced = fn.trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return compiled, {"trace_seconds": traced_at - began, "lower_seconds": lowered_at - traced_at,
                      "backend_compile_seconds": done - lowered_at, "compile_seconds": done - began,
                      "compile_cpu_seconds": time.process_time() - cpu_began}


def use_persistent_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory`, for every compile, however short or small.
    Call it before the process's first compile: JAX sets its cache up once, at that compile."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def time_steps(call, steps: int) -> list[float]:
    """Seconds of each of `steps` steps after a warm-up step; none at all for 0 (compile only)."""
    if steps == 0:
        return [float("nan")]
    times = []
    for _ in range(steps + 1):  # the first is the warm-up
        began = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - began)
    return times[1:]
