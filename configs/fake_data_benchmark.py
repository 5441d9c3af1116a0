"""ResNet-50 on synthetic data: the training step without input I/O, for throughput runs."""

from configs import default


def get_config():
    config = default.get_config()
    config.data.update(dict(name="fake", train_preprocess="none", eval_preprocess="none",
                            pca_lighting=0.0))
    config.train.num_steps = 100
    config.eval.every_steps = 100
    config.checkpoint.every_steps = 100
    config.log_every_steps = 10
    return config
