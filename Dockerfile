# safeguard-bot in a container: the daemon (`safeguard-bot watch`) by default, any command else.
#   docker build -t safeguard-bot --build-arg TORCH_INDEX="$CPU_INDEX" .   # CPU torch
#   docker build -t safeguard-bot:cuda .                                 # pip's default index
# TORCH_INDEX: the index torch comes from, e.g. PyTorch's CPU wheel index (you fill it in; the
# project names no index host). Empty: pip's default index, whose Linux torch is a CUDA build.
#   docker run -e HF_TOKEN -v safeguard-work:/work safeguard-bot         # the daemon
# BASE_IMAGE may be any image with python3 (>= 3.11, with venv), e.g. a CUDA one; CUDA wheels of
# torch bring their own CUDA runtime, so the host needs only the driver (`docker run --gpus all`).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/safeguard \
    PATH=/opt/safeguard/bin:$PATH \
    HF_HOME=/work/.cache/huggingface

# torch first, from TORCH_INDEX when set, so that installing the package does not pull another build
RUN python3 -m venv /opt/safeguard \
    && if [ -n "${TORCH_INDEX}" ]; then export PIP_INDEX_URL="${TORCH_INDEX}"; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md /tmp/src/
COPY bot /tmp/src/bot
COPY templates /tmp/src/templates
RUN pip install --no-cache-dir "/tmp/src[postgres]" \
    && rm -rf /tmp/src \
    && safeguard-bot version

# a non-root user, numeric for runAsNonRoot checks (another UID where the base image has a user
# 1000 already); a bind-mounted /work must be writable by it
ARG UID=1000
RUN useradd --create-home --uid "${UID}" --user-group --shell /usr/sbin/nologin safeguard \
    && mkdir -p /work \
    && chown safeguard:safeguard /work
USER ${UID}:${UID}
WORKDIR /work
# the work dir: ledger (SQLite unless SAFEGUARD_LEDGER_URL names a PostgreSQL), reports,
# merged models, the local feed and the Hub download cache
VOLUME /work

ENTRYPOINT ["safeguard-bot"]
CMD ["watch"]
