"""The prepared check of resnet_jax on one GPU: one command of at most 9 minutes on an NVIDIA H200,
and a tiny `--dry-run` on the CPU that the test suite runs.

    python -m benchmarks.gpu_check --cifar-dir DIR [--out FILE] [--skip PART,...] [--dry-run] \\
        [--time-limit SECONDS] [--cifar-steps N]

Parts, in order (`--skip` takes their names):

  tests       the project's tests whose numerics differ on a GPU (the networks against
              torchvision's, BN's statistics and gradients, scanned and rematerialised stages,
              a bfloat16 train step against the float32 one), by pytest, on the GPU
  jax_step    this project's ResNet-50 train step (benchmarks/train_step.py), batch 256 at 224,
              `model.dtype="auto"` (bfloat16 compute on a GPU), with torchvision's stride on the
              3x3 convolution, so that it is the network of the next part: compile seconds,
              images/s, peak memory, model FLOP utilisation
  torch_step  torchvision's ResNet-50 with AMP (bfloat16) and channels_last on the same GPU
              (benchmarks/torch_step.py), then the ratio of the two
  cifar       CIFAR-10 ResNet-20 with the paper's recipe (configs/cifar.py: 64k iterations,
              batch 128; Sec. 4.2) with `data.on_device=True` from the JPEG image folders in
              `--cifar-dir` (train/CLASS/*.jpg, test/CLASS/*.jpg): wall time and final test
              error beside Table 6's 8.75%

Each result is one JSON line on stdout and appended to `--out`; the first, `versions`, names
what it runs on: Python, jax, jaxlib, the CUDA plugin, flax, optax, orbax-checkpoint,
ml-collections, clu, numpy, torch, torchvision, the devices, and which of them pyproject.toml's
ranges do not cover (`untested`). A time guard (`--time-limit` seconds from the start, 510 by
default) skips a part that would start too late and stops the CIFAR run the way a preemption does
(SIGTERM: it saves and stops), reporting how far it got; a rerun with `--skip
tests,jax_step,torch_step` gives it the whole time. A last `summary` line names what passed,
failed and was skipped; the exit status is 1 when a part failed.

Nothing here needs TensorFlow. The GPU machine's image (Python 3.12, jax 0.11 with its CUDA
plugin, torch, torchvision) lacks ml-collections and clu and has flax, optax and orbax-checkpoint
of versions this project was not tested with: `bash benchmarks/gpu_carry.sh [CIFAR_ARCHIVE]` puts
the wheels of `CARRIED` (requirements.txt's pins, and a flax that runs on jax 0.11) and the
archive in build/gpu_check/ (ignored by git; name it in the device tool's `carry`), to install
there in front of the image's with

    pip install -q --no-index --no-deps --target /tmp/site build/gpu_check/wheels/*.whl &&
    export PYTHONPATH=/tmp/site && mkdir -p /tmp/cifar && tar xzf build/gpu_check/cifar.tar.gz -C /tmp/cifar &&
    python3 -m benchmarks.gpu_check --cifar-dir /tmp/cifar --out $OUT/gpu_check.jsonl

jax and jaxlib stay the image's: jaxlib must match the CUDA plugin, and its wheel alone is larger
than the 64 MiB that travel. Before anything runs, a module the check needs that cannot be found
(named with the wheel to carry), a carried distribution found at another version than its pin, or
a module that fails to import on this jax, is one line on stderr, and exit status 2.

`--dry-run`: every part at tiny sizes on the CPU (two quick tests; ResNet-18 at 32 px, batch 8;
ResNet-20 for 3 steps on an image folder it makes unless `--cifar-dir` is given).
"""

import os

# JAX would take 75% of the GPU's memory at its first use, leaving too little to the torch and
# pytest processes. Set before JAX starts a backend; they inherit it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import tomllib  # noqa: E402
import traceback  # noqa: E402
import xml.etree.ElementTree as ElementTree  # noqa: E402

import numpy as np  # noqa: E402

PARTS = ("tests", "jax_step", "torch_step", "cifar")
GPU_TESTS = ("tests/networks/test_convert.py", "tests/networks/test_models.py", "tests/networks/test_scan.py",
             "tests/training/test_precision.py")
DRY_RUN_TESTS = ("tests/networks/test_models.py::test_option_a_pads_with_exact_zeros",
                 "tests/networks/test_models.py::test_he_initialisation")
SIZES = {  # the check, and its dry run
    False: dict(model="resnet50", batch_size=256, image_size=224, steps=20, warmup=5,
                cifar_steps=64_000, time_limit=510.0, tests=GPU_TESTS, workers=4),
    True: dict(model="resnet18", batch_size=8, image_size=32, steps=2, warmup=1,
               cifar_steps=3, time_limit=600.0, tests=DRY_RUN_TESTS, workers=0)}
# Seconds a part needs at least: one that would start with less left is skipped.
MINIMUM_SECONDS = {"tests": 60, "jax_step": 60, "torch_step": 40, "cifar": 60}
STOP_MARGIN = 20  # seconds the CIFAR run is given to save and stop
PAPER_RESNET20_TEST_ERROR = 8.75  # Table 6, CIFAR-10 test error (%)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Distributions that travel as wheels (benchmarks/gpu_carry.sh): the GPU image lacks ml-collections
# and clu, and its flax, optax and orbax are versions not tested here. At requirements.txt's pins
# (Python 3.11's), but where Python >= 3.12 needs another: requirements.txt's flax 0.12.8, the
# last for Python 3.11, subclasses jax.experimental.hijax.HiPrimitive, which jax 0.11 removed;
# 0.12.12 is the flax tested with jax 0.11.2 and 0.12.1 on Python 3.12.
CARRIED = ("flax", "optax", "orbax-checkpoint", "ml-collections", "clu")
PYTHON_3_12_PINS = {"flax": "0.12.12"}
# The modules the check imports, by the distribution that has them: every part's, then each part's.
NEEDED = {"numpy": "numpy", "jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax",
          "orbax.checkpoint": "orbax-checkpoint", "ml_collections": "ml-collections",
          "clu": "clu", "etils.epath": "etils", "absl": "absl-py", "packaging": "packaging"}
PART_NEEDS = {"tests": {"pytest": "pytest", "torch": "torch", "torchvision": "torchvision"},
              "jax_step": {}, "torch_step": {"torch": "torch", "torchvision": "torchvision"},
              "cifar": {"PIL": "pillow"}}
# The versions the first line reports (and the CUDA plugin's, whatever its name).
REPORTED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "clu", "numpy",
            "torch", "torchvision")


def _name(distribution: str) -> str:
    """A distribution's name as packaging compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def carried_requirements(python: tuple[int, int] = sys.version_info[:2]) -> list[str]:
    """`NAME==VERSION` of each carried distribution for a Python version."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", f.read(), re.MULTILINE))
    pins = {_name(name): version for name, version in pins.items()}
    if python >= (3, 12):
        pins.update(PYTHON_3_12_PINS)
    return [f"{name}=={pins[_name(name)]}" for name in CARRIED]


def _version(distribution: str) -> str | None:
    """The version of the first copy of `distribution` on sys.path: the one Python imports."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or set to None in sys.modules
        return False


def needed_modules(parts: list[str], workers: int) -> dict[str, str]:
    """{module: distribution} of what running `parts` imports."""
    needed = dict(NEEDED)
    for part in parts:
        needed.update(PART_NEEDS[part])
    if "tests" in parts and workers:
        needed["xdist"] = "pytest-xdist"
    return needed


def missing_piece(needed: dict[str, str]) -> str | None:
    """One line naming what the check lacks here, or None: a module that cannot be found (and
    the wheel to carry for it), or a carried distribution at another version. Imports nothing."""
    carried = dict(pin.split("==") for pin in carried_requirements())
    python = ".".join(platform.python_version_tuple()[:2])
    for module, distribution in needed.items():
        if _findable(module):
            continue
        if distribution in carried:
            return (f"module {module!r} is missing: carry the wheel "
                    f"{distribution}=={carried[distribution]} (bash benchmarks/gpu_carry.sh, then "
                    "install build/gpu_check/wheels as benchmarks/gpu_check.py's docstring says)")
        return (f"module {module!r} is missing: carry a wheel of {distribution} for Python "
                f"{python} (pip download --no-deps --only-binary=:all: {distribution}; "
                "benchmarks/gpu_carry.sh carries only " + ", ".join(CARRIED) + ")")
    for distribution, version in carried.items():
        found = _version(distribution)
        if found != version:
            return (f"{distribution} is {found}, not the carried {version}: install the wheels "
                    "of build/gpu_check/wheels in front of the image's (pip install --no-deps "
                    "--target /tmp/site ...; PYTHONPATH=/tmp/site) as benchmarks/gpu_check.py's "
                    "docstring says")
    return None


def broken_import() -> str | None:
    """One line naming a module every part imports that is there but fails to import (a version
    that does not run on this jax, say), or None. torch loads in the parts' own processes."""
    for module, distribution in NEEDED.items():
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001  (whatever stops the import is the answer)
            first = (str(error).splitlines() or [""])[0]
            return (f"module {module!r} ({distribution} {_version(distribution)}) does not import "
                    f"with jax {_version('jax')}: {type(error).__name__}: {first}")
    return None


def versions() -> dict:
    """Python's and the distributions' versions, and those outside pyproject.toml's ranges."""
    from packaging.requirements import Requirement
    plugins = sorted({dist.metadata["Name"] for dist in importlib.metadata.distributions()
                      if _name(dist.metadata["Name"] or "").startswith("jax-cuda")})
    found = {name: _version(name) for name in (*REPORTED, *plugins)}
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    ranges = {_name(r.name): r.specifier for r in map(Requirement, [
        *project["dependencies"], *project["optional-dependencies"]["test"]])}
    untested = [f"{name} {version} (tested: {ranges[_name(name)]})"
                for name, version in found.items()
                if version and _name(name) in ranges
                and not ranges[_name(name)].contains(version, prereleases=True)]
    return {"python": platform.python_version(), "packages": found, "untested": untested}


class Reporter:
    """JSON lines to stdout and to `path`; each names the device and the date."""

    def __init__(self, path: str | None):
        import jax
        device = jax.devices()[0]
        self.path = path
        self.common = {"device_kind": device.device_kind, "jax_version": jax.__version__}

    def __call__(self, what: str, **fields) -> None:
        line = json.dumps({"what": what, **fields, **self.common, "date": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds")}, default=float)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def run_tests(args, report, seconds_left: float) -> bool:
    junit = os.path.join(tempfile.mkdtemp(prefix="gpu_check_"), "junit.xml")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={junit}", *args.sizes["tests"]]
    if args.sizes["workers"]:
        command += ["-n", str(args.sizes["workers"]), "--dist", "loadfile"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                              timeout=seconds_left - STOP_MARGIN)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        returncode, output = None, "timed out"
    counts, failed = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}, []
    if os.path.exists(junit):
        root = ElementTree.parse(junit).getroot()
        for suite in root.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    ok = returncode == 0 and counts["tests"] > 0
    report("tests", files=list(args.sizes["tests"]), returncode=returncode,
           passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
           failed=failed, skipped=counts["skipped"], ok=ok,
           **({} if ok else {"output_tail": output[-3000:]}))
    return ok


def run_jax_step(args, report, shared) -> bool:
    import jax

    from benchmarks import train_step
    from resnet_jax import flops
    sizes = args.sizes
    result = train_step.run(train_step.parse_args([
        "--model", sizes["model"], "--batch-size", str(sizes["batch_size"]),
        "--image-size", str(sizes["image_size"]), "--steps", str(sizes["steps"]),
        "--dtype", "auto", "--stride-on", "3x3", "--no-eval"]))
    peak = flops.peak_flops(jax.devices()[0].device_kind)
    stats = jax.devices()[0].memory_stats() or {}
    shared.update(macs=result["macs_per_image"], jax_images_per_second=result["images_per_second"],
                  peak_flops=peak)
    keep = ("model", "batch_size", "image_size", "dtype", "stride_on", "params", "macs_per_image",
            "trace_seconds", "lower_seconds", "backend_compile_seconds", "compile_seconds",
            "step_seconds", "step_seconds_min", "step_seconds_max", "images_per_second",
            "tflops_per_second", "peak_memory_bytes")
    report("train_step", framework="jax", **{k: result[k] for k in keep},
           device_peak_bytes_in_use=stats.get("peak_bytes_in_use"),
           mfu_percent=_mfu(result["macs_per_image"], result["images_per_second"], peak),
           ok=bool(np.isfinite(result["step_seconds"])))
    return True


def _mfu(macs: int, images_per_second: float, peak: float | None) -> float | None:
    from resnet_jax import flops
    return 100 * flops.train_flops_per_image(macs) * images_per_second / peak if peak else None


def run_torch_step(args, report, shared, seconds_left: float) -> bool:
    sizes = args.sizes
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.torch_step", "--model", sizes["model"],
         "--batch-size", str(sizes["batch_size"]), "--image-size", str(sizes["image_size"]),
         "--steps", str(sizes["steps"]), "--warmup", str(sizes["warmup"])],
        capture_output=True, text=True, cwd=ROOT, timeout=seconds_left - STOP_MARGIN)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.torch_step exited {done.returncode}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    macs = shared.get("macs")  # the same network as the jax_step's
    report("train_step", **result, macs_per_image=macs,
           mfu_percent=_mfu(macs, result["images_per_second"], shared.get("peak_flops"))
           if macs else None, ok=bool(np.isfinite(result["loss"])))
    if "jax_images_per_second" in shared:
        report("train_step_ratio", jax_over_torch=shared["jax_images_per_second"]
               / result["images_per_second"])
    return bool(np.isfinite(result["loss"]))


def make_image_folder(root: str, per_class: int = 4) -> str:
    """CIFAR-10's layout (train/CLASS/*.jpg, test/CLASS/*.jpg) at 32x32, ten classes of a colour
    each under noise: for the dry run."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for c, colour in enumerate(rng.uniform(0, 255, (10, 3))):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 25, (32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"))
    return root


def cifar_config(args, folder: str):
    from configs import cifar
    config = cifar.get_config("depth=20")
    config.data.name = f"imagefolder:{os.path.abspath(folder)}"
    config.data.on_device = True
    config.train.num_steps = args.cifar_steps
    if args.dry_run:
        config.train.batch_size = config.eval.batch_size = 8
        config.log_every_steps = config.eval.every_steps = config.checkpoint.every_steps = 3
    return config


def run_cifar(args, report, seconds_left: float) -> bool:
    from resnet_jax.training import loop, preemption
    folder = args.cifar_dir
    if folder is None:
        if not args.dry_run:
            raise ValueError("--cifar-dir: a folder of train/CLASS/*.jpg and test/CLASS/*.jpg "
                             "is needed for part cifar")
        folder = make_image_folder(tempfile.mkdtemp(prefix="gpu_check_images_"))
    config = cifar_config(args, folder)
    workdir = tempfile.mkdtemp(prefix="gpu_check_cifar_")
    finished = threading.Event()

    def guard():
        # At the deadline, the run's own preemption path: SIGTERM, a save, preemption.Preempted. Sent
        # again every few seconds in case the first came before the run had set its handler.
        # (A signal, not a JAX operation, on this thread.)
        if not finished.wait(max(0.0, seconds_left - STOP_MARGIN)):
            while not finished.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.wait(5.0)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # outside the run: ignored
    watcher = threading.Thread(target=guard, daemon=True)
    began = time.perf_counter()
    stopped_at = None
    watcher.start()
    try:
        loop.train_and_evaluate(config, workdir)
    except preemption.Preempted as stopped:
        stopped_at = stopped.step
    finally:
        finished.set()
        watcher.join()
        signal.signal(signal.SIGTERM, previous)
    wall = time.perf_counter() - began
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [row for row in map(json.loads, f) if "eval_accuracy" in row]
    error = 100 * (1 - evals[-1]["eval_accuracy"]) if evals else None
    report("cifar", model=config.model.name, data=os.path.abspath(folder), on_device=True,
           batch_size=config.train.batch_size, steps=config.train.num_steps,
           steps_done=config.train.num_steps if stopped_at is None else stopped_at,
           stopped_by_time_guard=stopped_at is not None, wall_seconds=wall,
           test_error_percent=error, eval_step=evals[-1]["step"] if evals else None,
           paper_test_error_percent=PAPER_RESNET20_TEST_ERROR, ok=error is not None)
    return error is not None


def parse_args(argv: list[str]) -> argparse.Namespace:
    from benchmarks import cli
    parser = cli.OneLineParser(prog="python -m benchmarks.gpu_check",
                               description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--cifar-dir", default=None, help="train/CLASS/*.jpg, test/CLASS/*.jpg")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file too")
    parser.add_argument("--skip", default="", help=f"parts not to run, of {', '.join(PARTS)}")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds from the start for all parts; default 510")
    parser.add_argument("--cifar-steps", type=int, default=None,
                        help="part cifar's iterations; default the paper's 64,000 (3 in a dry run)")
    args = parser.parse_args(argv)
    args.skip = [part for part in args.skip.split(",") if part]
    unknown = [part for part in args.skip if part not in PARTS]
    if unknown:
        parser.error(f"--skip: {unknown[0]!r} is not a part; the parts are {', '.join(PARTS)}")
    args.sizes = SIZES[args.dry_run]
    if args.time_limit is None:
        args.time_limit = args.sizes["time_limit"]
    elif args.time_limit <= 0:
        parser.error(f"--time-limit must be positive; got {args.time_limit}")
    if args.cifar_steps is None:
        args.cifar_steps = args.sizes["cifar_steps"]
    elif args.cifar_steps < 1:
        parser.error(f"--cifar-steps must be a positive integer; got {args.cifar_steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    end = time.monotonic() + args.time_limit
    needed = needed_modules([part for part in PARTS if part not in args.skip],
                            args.sizes["workers"])
    problem = missing_piece(needed)
    if not problem:
        import jax
        if args.dry_run:
            jax.config.update("jax_platforms", "cpu")
        problem = broken_import()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    report = Reporter(args.out)
    report("versions", **versions(), platform=jax.default_backend(),
           devices=[device.device_kind for device in jax.devices()])
    shared: dict = {}
    runs = {"tests": lambda left: run_tests(args, report, left),
            "jax_step": lambda left: run_jax_step(args, report, shared),
            "torch_step": lambda left: run_torch_step(args, report, shared, left),
            "cifar": lambda left: run_cifar(args, report, left)}
    passed, failed, skipped = [], [], {}
    for part, run in runs.items():
        left = end - time.monotonic()
        if part in args.skip:
            skipped[part] = "--skip"
        elif left < MINIMUM_SECONDS[part]:
            skipped[part] = f"time guard: {left:.0f} s left"
        else:
            try:
                (passed if run(left) else failed).append(part)
            except Exception as error:  # noqa: BLE001  (one part's failure is reported; the rest run)
                failed.append(part)
                report("error", part=part, error=f"{type(error).__name__}: {error}"[:2000],
                       traceback=traceback.format_exc()[-3000:])
    report("summary", passed=passed, failed=failed, skipped=skipped,
           seconds=args.time_limit - (end - time.monotonic()), ok=not failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
