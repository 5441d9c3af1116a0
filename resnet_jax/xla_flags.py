"""XLA's CPU backend: fusion without duplication, set for the main job and the benchmarks.

By default XLA's CPU backend fuses an elementwise producer into every consumer, recomputing it
in each: a ResNet's residual stream (ReLU of the shortcut plus BN of the branch, block after
block) is then recomputed back to the start of its stage inside every fusion that reads it, in
the forward pass and in each ReLU's backward pass (the unrolled ResNet-152 train step: 106,000
instructions inside its fusions, fusions of up to 746). With multi-output fusion on, XLA fuses
without duplicating. Measured on the 2-core CPU (benchmarks/README.md): ResNet-50 b16 at 224,
step 8.06 -> 5.93 s and compile 15.7 -> 9.8 s; unrolled ResNet-152 b8, step 12.7 -> 8.9 s and
compile 38.6 -> 22.7 s. The option's key names the CPU backend; no GPU or TPU run was made
with it.
"""

import os

CPU_FUSION = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"


def set_cpu_fusion(environ=os.environ) -> None:
    """Adds `CPU_FUSION` to XLA_FLAGS unless XLA_FLAGS already sets backend extra options (then
    the user's choice stands). XLA reads its flags when JAX starts its first backend: call this
    before that; after it, it changes nothing."""
    flags = environ.get("XLA_FLAGS", "")
    if "xla_backend_extra_options" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {CPU_FUSION}".strip()
