"""Bad input refused with the knob, file or line named: gin macro typos,
an unset model directory, empty or non-UTF-8 data files
(docs/reliability.md lists them)."""

import gin
import pytest
import seqio

import tasks  # noqa: F401  (registers the FLAN tasks)
from moe_jax import gin_utils
from moe_jax.main import main
from moe_jax.train import run as run_lib
from tasks import flan2022
from tasks import flan2022_sources as src
from tests.test_tasks_flan2022 import local_data  # noqa: F401  (fixture)

RUN_FILE = "gin/runs/mini_flan_cpu.gin"


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_a_macro_typo_names_the_closest_macro():
  with pytest.raises(ValueError, match=r"--gin\.NUM_EXPERT=4: no binding "
                     r"uses the macro NUM_EXPERT; did you mean NUM_EXPERTS"):
    main(["train", f"--gin_file={RUN_FILE}", "--gin.MODEL_DIR='/tmp/x'",
          "--gin.NUM_EXPERT=4"])
  flags = ["MODEL_DIR='/tmp/x'", "NUM_EXPERTS=4"]
  gin_utils.parse([RUN_FILE], flags)
  gin_utils.check_macros_used(flags, gin.config_str())
  assert run_lib.configured_run().model.encoder_moe.layer.num_experts == 4


@pytest.mark.parametrize("value", ["''", "None", "'  '"])
def test_an_unset_model_dir_is_refused(value):
  gin_utils.parse([RUN_FILE], [f"MODEL_DIR={value}"])
  with pytest.raises(ValueError, match=r"model_dir \(MODEL_DIR\) must name "
                     "a directory"):
    run_lib.configured_run()


def test_an_empty_file_in_a_mixture_is_refused_with_its_path(local_data):
  empty = local_data / src.cot_file("qasc")
  empty.write_text("")
  mixture = seqio.get_mixture_or_task("flan2022_cot")
  qasc = [t for t in mixture.tasks if "qasc" in t.name][0]
  with pytest.raises(ValueError, match=rf"{empty}: no examples .*empty"):
    mixture.get_rate(qasc)


def _source_and_file(kind: str):
  """A FLAN source and its data file (relative to the data directory)."""
  if kind == "tsv":
    return (src.COT_DATASETS_SPECS[src.COT_DATASETS.index("qasc")].source(),
            src.cot_file("qasc"))
  submix = src.EXPORT_SUBMIXES[0]
  variant = src.SUBMIX_VARIANTS[submix][0]
  return (flan2022.export_source(submix, variant),
          src.export_file(submix, variant))


@pytest.mark.parametrize("kind", ["tsv", "jsonl"])
def test_invalid_utf8_names_the_file_and_line(local_data, kind):
  source, name = _source_and_file(kind)
  path = local_data / name
  lines = path.read_bytes().split(b"\n")
  lines[2] = lines[2][:3] + b"\xff\xfe" + lines[2][3:]
  path.write_bytes(b"\n".join(lines))
  with pytest.raises(ValueError, match=rf"{path}:3: not valid UTF-8 \(byte "
                     r"0xff at byte 4"):
    list(source.get_dataset("train", shuffle=False).as_numpy_iterator())
