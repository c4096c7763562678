# megapatch for NVIDIA GPUs: PyTorch and CUDA from the official image (pinned by tag),
# DeepSpeed (no compiled ops needed: megapatch uses torch's fused AdamW), Triton, and this
# checkout installed as the `megapatch` command, run as an unprivileged user.
#
#   docker build -t megapatch .
#   docker run --gpus all --ipc=host --rm -v "$PWD/data:/workspace/data" \
#       -v "$PWD/runs:/workspace/runs" megapatch train configs/tiny.yaml
#
# More (several GPUs, SLURM with pyxis/enroot or apptainer): launch/README.md.

# CUDA 12.8 "devel" (a C compiler for Triton's launchers and torch.compile, nvcc for any
# DeepSpeed op a user's DeepSpeed config asks for), PyTorch 2.7.1, Python 3.11, Triton.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel

ARG DEEPSPEED_VERSION=0.19.8

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MEGAPATCH_HOME=/opt/megapatch

# procps: pgrep, with which the launch scripts signal the ranks; pdsh and ssh: the DeepSpeed
# launcher's multi-node mode; libaio: DeepSpeed's async I/O op.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps pdsh openssh-client libaio-dev \
    && rm -rf /var/lib/apt/lists/*

# DeepSpeed against the image's torch. Its optimizer is torch's fused AdamW (set by
# megapatch), so no op is compiled here; one a config asks for JIT-compiles on first use
# (into ~/.cache/torch_extensions).
RUN pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

# The package, its remaining dependencies (torch, triton and deepspeed are already
# there) and the Hugging Face export extra; pyproject.toml holds their version ranges.
WORKDIR /opt/megapatch
COPY pyproject.toml README.md ./
COPY megapatch ./megapatch
COPY data_prep ./data_prep
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[export]"
COPY configs ./configs
COPY launch ./launch

RUN useradd --create-home --uid 1000 --shell /bin/bash megapatch \
    && mkdir -p /workspace \
    && chown megapatch:megapatch /workspace \
    && ln -s /opt/megapatch/configs /workspace/configs \
    && ln -s /opt/megapatch/launch /workspace/launch
# Numeric, so that runtimes which insist on a non-root uid can check it.
USER 1000:1000
WORKDIR /workspace

ENTRYPOINT ["megapatch"]
CMD ["--help"]
