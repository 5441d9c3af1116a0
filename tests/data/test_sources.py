"""What data.name names, shared by both pipelines: split specs read as TFDS reads them, the same
classes, sizes and checks with data.on_device True or False."""

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from resnet_jax.data import on_device, pipeline, sources

SIZES = {"train": 1497, "test": 300, "extra": 7}


def tfds_rows(spec: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    """The rows TFDS's own parser gives for `spec`: the independent reading."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class Split:
        def __init__(self, n):
            self.num_examples = n

    instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(
        {name: Split(n) for name, n in sizes.items()})
    return [(i.splitname, i.from_ or 0, sizes[i.splitname] if i.to is None else i.to)
            for i in instructions]


BOUNDARY = st.one_of(st.none(), st.integers(-2000, 2000).map(str),
                     st.integers(-100, 100).map(lambda p: f"{p}%"))
PART = st.tuples(st.sampled_from(sorted(SIZES)), st.one_of(st.none(), st.tuples(BOUNDARY, BOUNDARY)))


def spec_of(parts) -> str:
    return "+".join(name if window is None else f"{name}[{window[0] or ''}:{window[1] or ''}]"
                    for name, window in parts)


@settings(max_examples=300, deadline=None)
@given(st.lists(PART, min_size=1, max_size=3))
def test_split_specs_are_read_as_tfds_reads_them(parts):
    spec = spec_of(parts)
    if any(w and w[0] and w[1] and w[0].endswith("%") != w[1].endswith("%") for _, w in parts):
        with pytest.raises(ValueError, match="not both"):  # TFDS reads 1:5% as 1%:5%
            sources.split_rows(spec, SIZES)
        return
    try:
        want = tfds_rows(spec, SIZES)
    except (AssertionError, ValueError):  # TFDS refuses it (an empty slice of a split, say)
        return
    got = sources.split_rows(spec, SIZES)
    assert [(n, a, b) for n, a, b in got if b > a] == [(n, a, b) for n, a, b in want if b > a], spec


@pytest.mark.parametrize("spec", ["validation", "train[1:2", "train[a:b]", "train[:5]+", "train[1%%:]"])
def test_a_spec_of_no_split_names_the_splits(spec):
    with pytest.raises(ValueError, match=r"^split .* NAME one of extra, test, train$"):
        sources.split_rows(spec, SIZES)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("test", 2)):
        for c in ("bee", "ant"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return root


def test_an_image_folder_s_classes_are_sorted_and_its_files_in_class_order(folder):
    names, files = sources.folder(str(folder))
    assert names == ("ant", "bee")
    assert [(path.split("/")[-2:], label) for path, label in files["train"]] == [
        (["ant", f"{i}.png"], 0) for i in range(5)] + [(["bee", f"{i}.png"], 1) for i in range(5)]


@pytest.mark.parametrize("name", ["digits", "folder"])
@pytest.mark.parametrize("train_split", ["train", "train[20%:]+test[:1]", "train[:-3]"])
def test_both_pipelines_see_the_same_data(name, train_split, folder):
    config = ml_collections.ConfigDict(dict(
        name="digits" if name == "digits" else f"imagefolder:{folder}", image_size=8,
        train_split=train_split, eval_split="test"))
    assert pipeline.info(config) == on_device.info(config)


def test_a_train_split_that_leaves_a_class_out_is_refused_by_both_pipelines(folder):
    config = ml_collections.ConfigDict(dict(name=f"imagefolder:{folder}", image_size=8,
                                            train_split="train[:50%]"))
    for info in (pipeline.info, on_device.info):
        with pytest.raises(ValueError, match=r"class 'bee' has no images in data.train_split="
                                             r"'train\[:50%\]' \('bee' has 2 in split 'test', 5 "
                                             r"in split 'train'\)"):
            info(config)
