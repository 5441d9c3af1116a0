"""The main job: python -m resnet_jax.main --config=configs/resnet50.py --workdir=DIR

Fields of the config are overridable on the command line (--config.train.batch_size=4096), and
parametrised configs take an argument (--config=configs/cifar.py:depth=56,plain=True). Without
--config the quickstart runs. On a pod every process runs this same command.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import sharding

_QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "quickstart.py")

config_flags.DEFINE_config_file("config", _QUICKSTART, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and metrics.jsonl.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs "
                    "that no cluster environment (TPU pod, SLURM, MPI) describes.")
flags.DEFINE_integer("num_processes", None, "Processes in all, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from resnet_jax import train  # after distributed start-up: it imports TensorFlow and touches devices

    config = FLAGS.config
    if config.compilation_cache_dir:
        import jax
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir.replace(
            "{workdir}", os.path.abspath(FLAGS.workdir)))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    logging.info("Config:\n%s", config)
    train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
