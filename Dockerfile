# GPU volunteer image: CUDA runtime + swarmnode with the vllm extra.
# Build: docker build -t swarmnode .   Run: docker run --gpus all -p 4001:4001 -v $PWD/data:/data swarmnode run --data-dir /data
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY swarmnode ./swarmnode
COPY protocol ./protocol
COPY compression ./compression
RUN pip install "torch==2.14.0" ".[vllm,tasks]"

EXPOSE 4001
VOLUME ["/data"]
ENTRYPOINT ["swarmnode"]
CMD ["run", "--data-dir", "/data", "--listen", "/ip4/0.0.0.0/tcp/4001", "--engine", "vllm"]
