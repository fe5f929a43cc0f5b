# One image for the four services; docker-compose.yml picks the service with its command
# (`python -m svc_customer`, ...). Build from the repo root: `docker build -t simplebank .`
# gen/ must be generated first (`make gen`): the image copies it, it does not run protoc.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app:/app/gen \
    BANK_BIND_HOST=0.0.0.0

RUN groupadd --system --gid 10001 bank \
    && useradd --system --uid 10001 --gid bank --home-dir /app --no-create-home --shell /usr/sbin/nologin bank

WORKDIR /app

# Dependencies first, so a code change does not reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY common/ common/
COPY svc_customer/ svc_customer/
COPY svc_account/ svc_account/
COPY svc_transfer/ svc_transfer/
COPY svc_notify/ svc_notify/
COPY gen/ gen/
COPY devstack/ devstack/

USER bank

# Default command only; compose sets one per service.
CMD ["python", "-m", "svc_customer"]
