# tunekit on CUDA (A100/H100). Build: docker build -t tunekit .
# Run:   docker run --gpus all -v $PWD:/work -w /work tunekit accelerate launch --config_file configs/accelerate/single-node-8gpu.yaml -m tunekit train CONFIG.yaml
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev git ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/tunekit
# Dependencies first (cached layer): the CUDA build of torch from the default index, then the verified stack.
COPY requirements/ requirements/
RUN pip install --upgrade pip \
    && pip install "torch==2.13.0" \
    && grep -v '^torch==' requirements/cpu.txt | pip install -r /dev/stdin
COPY pyproject.toml README.md ./
COPY src/ src/
COPY configs/ configs/
RUN pip install --no-deps -e .
# DeepSpeed builds its CUDA ops on first use; a user without write access to site-packages still works.
RUN mkdir -p $TORCH_EXTENSIONS_DIR && chmod 777 $TORCH_EXTENSIONS_DIR
ENTRYPOINT []
CMD ["tunekit", "--help"]
