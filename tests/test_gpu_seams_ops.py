"""CPU guards for what only a GPU machine or a cluster would show (issue 17 items 2, 9, 12): the attention kernel's
availability, the shared-output_dir agreement between ranks, and the Docker image's invariants."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tunekit import attention
from tunekit.attention import attention_problem
from tunekit.cli import main
from tunekit.distributed import shared_dir_problem

REPO = Path(__file__).resolve().parents[1]
FLASH_MISSING = ("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                 "(pip install flash-attn --no-build-isolation), not installed here; use auto")
NO_CUDA = "model.attn_implementation: flash_attention_2 needs a CUDA GPU, none is visible here; use auto"


# ---------------------------------------------------------------- item 2: flash_attention_2 needs flash-attn and a GPU


@pytest.mark.parametrize("attn, flash_installed, cuda, expected", [
    ("sdpa", False, False, None),
    ("eager", False, False, None),
    (None, False, False, None),
    ("flash_attention_2", True, True, None),
    ("flash_attention_2", False, True, FLASH_MISSING),
    ("flash_attention_2", True, False, NO_CUDA),
    ("flash_attention_2", False, False, NO_CUDA),  # no GPU: installing the package would not help
    ("flash_attention_2", False, None, FLASH_MISSING),  # validate: CUDA not probed, only the package judged
    ("flash_attention_2", True, None, None),
])
def test_attention_problem(attn, flash_installed, cuda, expected):
    assert attention_problem(attn, flash_installed, cuda) == expected


def flash_config(tmp_path: Path, tiny_base, demo_data) -> Path:
    path = tmp_path / "flash.yaml"
    path.write_text(
        f"method: lora\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: {tiny_base}\n"
        "  attn_implementation: flash_attention_2\n"
        f"data:\n  sources:\n    - path: {demo_data['train']}\n      format: alpaca\n  cache_dir: {tmp_path / 'cache'}\n"
    )
    return path


@pytest.mark.parametrize("cuda, flash_installed, expected", [(False, False, NO_CUDA), (True, False, FLASH_MISSING)])
def test_train_refuses_flash_attention_it_cannot_run_before_anything_loads(
        tmp_path, tiny_base, demo_data, capsys, monkeypatch, cuda, flash_installed, expected):
    monkeypatch.setattr(attention, "cuda_available", lambda: cuda)
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: flash_installed)
    assert main(["train", str(flash_config(tmp_path, tiny_base, demo_data))]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing created


def test_validate_warns_about_missing_flash_attn_without_importing_torch():
    """The shipped example configs name flash_attention_2: they stay valid here (exit 0), with one warning line."""
    config = REPO / "configs" / "examples" / "llama3-8b-lora.yaml"
    code = ("import sys; from tunekit.cli import main; "
            f"rc = main(['validate', {str(config)!r}]); "
            "assert 'torch' not in sys.modules, 'heavy import'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: model.attn")]
    assert warnings == ([] if attention.flash_attn_installed() else [f"warning: {FLASH_MISSING}"])


# ---------------------------------------------------------------- item 9: every node must see rank 0's output_dir


def test_shared_dir_problem_names_the_blind_ranks_and_hosts():
    assert shared_dir_problem("runs/x", [("n1", True), ("n1", True)]) is None
    assert shared_dir_problem("runs/x", [("n1", True)]) is None
    verdicts = [("n1", True), ("n1", True), ("n2", False), ("n2", False), ("n3", False), ("n1", True)]
    problem = shared_dir_problem("runs/x", verdicts)
    assert problem.startswith("output_dir: runs/x is not on a filesystem every node shares: rank(s) 2-4 (on n2, n3)")
    assert "\n" not in problem


WORKER = """
import datetime, json, os, sys
import torch
import torch.distributed as dist
from tunekit.distributed import check_shared_output_dir
from tunekit.errors import UserError

rank, backend = int(os.environ["RANK"]), os.environ["BACKEND"]
if backend == "nccl":
    torch.cuda.set_device(rank)
dist.init_process_group(backend, timeout=datetime.timedelta(seconds=30))
results = {}
for case, output_dir in (("shared", sys.argv[1]), ("not_shared", sys.argv[2 + rank])):
    try:
        check_shared_output_dir(output_dir, wait_seconds=0.5)
        results[case] = None
    except UserError as exc:
        results[case] = str(exc)
    results[case + "_files"] = sorted(os.listdir(output_dir))
dist.barrier()  # gloo aborts ('terminate called without an active exception') if a peer leaves first
dist.destroy_process_group()
print(json.dumps(results), flush=True)
os._exit(0)  # the abort can also come from gloo's threads at interpreter teardown: skip the C++ static destructors
"""


def run_two_ranks(tmp_path: Path, backend: str = "gloo") -> list[dict]:
    """Start two ranks of WORKER: each checks one shared directory, then its own directory (a node-local disk).
    Returns each rank's results; fails (never hangs) when a rank does not finish within 60 s."""
    shared, views = tmp_path / "shared", [tmp_path / "node0", tmp_path / "node1"]
    for path in (shared, *views):
        path.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "BACKEND": backend}
        procs.append(subprocess.Popen([sys.executable, str(script), str(shared), *map(str, views)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)  # a hang fails here instead of blocking the suite
            assert proc.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()
    return outputs


@pytest.mark.slow
def test_two_ranks_without_a_shared_output_dir_all_refuse_with_the_same_line(tmp_path):
    """Two gloo processes (5-10 s on 2 cores): with one output_dir both pass and the token is gone; with a different
    directory per rank (a node-local disk) both raise the same UserError and neither hangs."""
    outputs = run_two_ranks(tmp_path)
    for result in outputs:
        assert result["shared"] is None and result["shared_files"] == []  # passed, and left no token behind
        assert result["not_shared"] == outputs[0]["not_shared"]  # every rank refuses with the same line
        assert re.match(r"output_dir: .*node0 is not on a filesystem every node shares: rank\(s\) 1 \(on ",
                        result["not_shared"])
    assert outputs[1]["not_shared_files"] == []  # rank 0 removed its token; rank 1 never saw one


# ---------------------------------------------------------------- item 12: the Docker image (not buildable here)

DOCKERFILE = REPO / "Dockerfile"


def dockerfile_runs() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def pin(requirements: Path, name: str) -> str:
    found = [line.split("==", 1)[1].strip() for line in requirements.read_text().splitlines()
             if line.split("==", 1)[0].strip().lower() == name]
    assert len(found) == 1, f"{requirements.name} must pin {name} exactly once"
    return found[0]


def test_dockerfile_installs_torch_for_the_base_images_cuda():
    lines = dockerfile_runs()
    base = next(line for line in lines if line.startswith("FROM "))
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base)
    assert cuda, base
    index = f"https://download.pytorch.org/whl/cu{cuda.group(1)}{cuda.group(2)}"
    torch_installs = [line for line in lines if re.search(r"pip install [^&]*torch==", line)]
    assert torch_installs, "the Dockerfile must pin torch"
    for line in torch_installs:
        command = next(part for part in line.split("&&") if "torch==" in part)
        assert f"torch=={pin(REPO / 'requirements' / 'cpu.txt', 'torch')}" in command  # the verified version
        assert f"--index-url {index}" in command, f"torch must come from the CUDA {cuda.group(1)}.{cuda.group(2)} index"


def test_dockerfile_installs_pinned_flash_attn_and_prebuilds_deepspeed_ops():
    text = " ".join(dockerfile_runs())
    cuda_reqs = REPO / "requirements" / "cuda.txt"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", pin(cuda_reqs, "flash-attn"))
    assert re.search(r"pip install --no-build-isolation -r requirements/cuda\.txt", text)
    # DeepSpeed's CPU Adam (offload_optimizer) and fused Adam, compiled into the image, not on first use on every node
    ds_install = re.search(r"(DS_BUILD_\w+=1 )+[^&]*pip install --no-build-isolation [^&]*deepspeed==", text)
    assert ds_install and "DS_BUILD_CPU_ADAM=1" in ds_install.group(0), "deepspeed must be built with DS_BUILD_CPU_ADAM=1"
    assert re.search(r"TORCH_CUDA_ARCH_LIST=\S*8\.0\S*9\.0", text), "no GPU at build time: name the archs (A100, H100)"


def test_every_path_the_dockerfile_copies_or_names_exists():
    lines = dockerfile_runs()
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                if not source.startswith("--"):
                    assert (REPO / source).exists(), f"Dockerfile: COPY {source}: no such path"
    named = re.findall(r"(?:configs|requirements)/[\w./-]+\.(?:ya?ml|txt)", DOCKERFILE.read_text(encoding="utf-8"))
    assert named
    for path in named:
        assert (REPO / path).is_file(), f"Dockerfile names {path}, which does not exist"


def test_every_accelerate_config_the_docs_name_exists():
    files = [DOCKERFILE, REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {(f.name, m) for f in files for m in re.findall(r"configs/accelerate/[\w.-]+\.ya?ml", f.read_text())}
    assert named
    missing = sorted(f"{where}: {path}" for where, path in named if not (REPO / path).is_file())
    assert not missing, missing
