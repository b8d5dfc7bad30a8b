# tunekit on CUDA (A100/H100). Build: docker build -t tunekit .   (add --build-arg MAX_JOBS=N: see flash-attn below)
# Run:   docker run --gpus all -v $PWD:/work -w /work tunekit accelerate launch --config_file configs/accelerate/single-node-8gpu-zero3.yaml -m tunekit train CONFIG.yaml
# tests/test_gpu_seams_ops.py checks this file's invariants on CPU (torch from the image's CUDA index, flash-attn,
# DeepSpeed ops, every copied or named path exists); docs/gpu-checks.md says how to check the built image on a GPU.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

# Parallel compile jobs for flash-attn (each nvcc job can take ~4 GB of RAM).
ARG MAX_JOBS=4
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions TOKENIZERS_PARALLELISM=false MAX_JOBS=$MAX_JOBS
# No GPU during `docker build`: name the architectures to compile CUDA code for, A100 (8.0) and H100 (9.0).
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0" FLASH_ATTN_CUDA_ARCHS="80;90"
# tests/test_gpu.py runs its image checks only where this is set.
ENV TUNEKIT_IMAGE=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev git ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/tunekit
# Dependencies first (cached layers). Order matters:
#  1. torch, the version requirements/cpu.txt verified, built for this image's CUDA 12.8 (the cu128 index: the default
#     index's build may target another CUDA), and the tools that builds below import without build isolation;
#  2. DeepSpeed with its CPU Adam (offload_optimizer) and fused Adam ops compiled now, against that torch, instead of
#     on first use on every node (DS_BUILD_*: DeepSpeed's pre-install switches; --no-build-isolation: the build
#     must see the installed torch);
#  3. the rest of the verified stack (torch and deepspeed already satisfied);
#  4. requirements/cuda.txt: flash-attn (the example configs' flash_attention_2), pinned there; its setup takes the
#     prebuilt wheel matching torch/CUDA/python when one is published, else compiles against the installed torch.
COPY requirements/ requirements/
RUN pip install --upgrade pip setuptools wheel packaging psutil py-cpuinfo ninja \
    && pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 \
    && python -c "import sys, torch; cuda = torch.version.cuda or 'none'; sys.exit(0 if cuda.startswith('12.8') else f'torch built for CUDA {cuda}, the image has 12.8')"
RUN DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 pip install --no-build-isolation "$(grep '^deepspeed==' requirements/cpu.txt)" \
    && grep -v -e '^torch==' -e '^deepspeed==' requirements/cpu.txt | pip install -r /dev/stdin
RUN pip install --no-build-isolation -r requirements/cuda.txt
COPY pyproject.toml README.md ./
COPY src/ src/
COPY configs/ configs/
RUN pip install --no-deps -e .
# Other DeepSpeed ops still build on first use; a user without write access to site-packages still works.
RUN mkdir -p $TORCH_EXTENSIONS_DIR && chmod 777 $TORCH_EXTENSIONS_DIR
ENTRYPOINT []
CMD ["tunekit", "--help"]
