"""The data: what `data.name` names (`sources`, for both pipelines), the tf.data pipelines each
host runs (`pipeline`) and their preprocessing (`preprocess`, the paper's augmentation), the data
set kept in device memory with augmentation inside the step (`on_device`), and what the jitted
steps do to a batch before the network (`device_inputs`). Nothing here imports the training
code."""
