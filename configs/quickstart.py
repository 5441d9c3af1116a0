"""The quickstart and embedded default: CIFAR-style ResNet-20 (Sec. 4.2) on scikit-learn's 8x8
handwritten digits, which need no download. A few minutes on a 2-core CPU, compile included.
--config.data.on_device=True trains from the digits held on the devices, without TensorFlow."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.update(dict(name="cifar_resnet20", shortcut="A", width=16))
    config.data.update(dict(
        name="digits", train_split="train", eval_split="test", image_size=16,
        train_preprocess="none", eval_preprocess="none", pca_lighting=0.0,
        mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), num_classes=10))
    config.train.update(dict(batch_size=64, num_steps=300))
    config.schedule.update(dict(name="cosine", base_lr=0.1, scale_by_batch=False, warmup_epochs=1.0))
    config.eval.update(dict(batch_size=64, every_steps=100))
    config.checkpoint.update(dict(every_steps=100, keep=2))
    config.log_every_steps = 50
    return config
